"""The monitoring objects (components/monitoring.py) under Pulumi's mocks, every stack.

PodMonitoring and Rules are Managed Prometheus' CRDs, not in Kubernetes' own schema,
and no package here ships their schema: each field the program sets is checked here
against what the CRDs (monitoring.googleapis.com/v1) allow, and against the objects
it must agree with (the StatefulSet's pod labels and its named metrics port).
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

import pytest

from components import monitoring
from components.config import ConfigError, load_stack_config
from tools.mockrun import ProgramRun, reveal, run_program, stack_config, stack_names

STACKS = stack_names()
# The CRDs' duration format (Prometheus durations, as GMP's openAPI pattern has them).
DURATION = re.compile(r"^((\d+)y)?((\d+)w)?((\d+)d)?((\d+)h)?((\d+)m)?((\d+)s)?((\d+)ms)?$")
# What PodMonitoring's spec and endpoints, and a Rules group and rule, may hold.
POD_MONITORING_SPEC = {"selector", "endpoints", "targetLabels", "limits", "filterRunning"}
ENDPOINT = {
    "port", "scheme", "interval", "timeout", "path", "params", "proxyUrl",
    "metricRelabeling", "authorization", "basicAuth", "oauth2", "tls",
}  # fmt: skip
GROUP = {"name", "interval", "rules"}
RULE = {"record", "alert", "expr", "for", "labels", "annotations"}
NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # an object name (DNS label)
ALERT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # a Prometheus metric name


@cache
def _run(stack: str) -> ProgramRun:
    run = run_program(stack_config(stack), stack)
    assert run.error is None, run.error
    return run


def _custom(stack: str, kind: str) -> list[dict[str, Any]]:
    return [reveal(m) for _, m in _run(stack).kubernetes_objects() if m["kind"] == kind]


@pytest.mark.parametrize("stack", STACKS)
def test_rabbitmq_is_scraped_where_its_pods_serve_metrics(stack: str) -> None:
    statefulset = _run(stack).kubernetes_object("StatefulSet")
    template = statefulset["spec"]["template"]
    ports = {
        p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c["ports"]
    }
    found = {
        m["metadata"]["name"]: m
        for m in _custom(stack, "PodMonitoring")
        if m["metadata"]["namespace"] == statefulset["metadata"]["namespace"]
    }
    assert set(found) == {monitoring.METRICS_JOB, monitoring.QUEUES_JOB}
    for name, pm in found.items():
        assert pm["apiVersion"] == "monitoring.googleapis.com/v1"
        assert NAME.match(name)
        assert pm["metadata"]["namespace"] == statefulset["metadata"]["namespace"]
        spec = pm["spec"]
        assert set(spec) <= POD_MONITORING_SPEC
        # The selector picks the StatefulSet's pods (and only by its stable labels).
        selector = spec["selector"]["matchLabels"]
        assert selector.items() <= template["metadata"]["labels"].items()
        assert selector == statefulset["spec"]["selector"]["matchLabels"]
        (endpoint,) = spec["endpoints"]
        assert set(endpoint) <= ENDPOINT
        assert ports[endpoint["port"]] == 15692  # the prometheus plugin's listener
        assert DURATION.match(endpoint["interval"]) and endpoint["interval"] != ""
        assert all(isinstance(v, list) for v in endpoint.get("params", {}).values())
    assert found[monitoring.METRICS_JOB]["spec"]["endpoints"][0]["path"] == "/metrics"
    queues = found[monitoring.QUEUES_JOB]["spec"]["endpoints"][0]
    assert queues["path"] == "/metrics/detailed"
    assert queues["params"] == {"family": list(monitoring.QUEUE_FAMILIES), "vhost": ["celery"]}


@pytest.mark.parametrize("stack", STACKS)
def test_the_workers_are_scraped_where_their_pods_serve_metrics(stack: str) -> None:
    deployment = _run(stack).kubernetes_object("Deployment")
    template = deployment["spec"]["template"]
    (container,) = template["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    (pm,) = [
        m
        for m in _custom(stack, "PodMonitoring")
        if m["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    ]
    assert pm["metadata"]["name"] == monitoring.WORKERS_JOB
    assert set(pm["spec"]) <= POD_MONITORING_SPEC
    selector = pm["spec"]["selector"]["matchLabels"]
    assert selector.items() <= template["metadata"]["labels"].items()
    assert selector == deployment["spec"]["selector"]["matchLabels"]
    (endpoint,) = pm["spec"]["endpoints"]
    assert set(endpoint) <= ENDPOINT and endpoint["path"] == "/metrics"
    # The named port is where app.metrics listens: the port the env hands the worker.
    assert str(int(ports[endpoint["port"]])) == env["CELERY_METRICS_PORT"] == "9808"


def test_prefork_workers_get_no_metrics_objects() -> None:
    raw = stack_config("prod")
    raw["celery-cluster:workers"] = {**raw["celery-cluster:workers"], "pool": "prefork"}
    run = run_program(raw, "prod")
    assert run.error is None, run.error
    names = {m["metadata"]["name"] for _, m in run.kubernetes_objects()}
    assert not names & {monitoring.WORKERS_JOB, monitoring.WORKER_RULES_NAME}
    (container,) = run.kubernetes_object("Deployment")["spec"]["template"]["spec"]["containers"]
    assert "ports" not in container
    assert "CELERY_METRICS_PORT" not in {e["name"] for e in container["env"]}


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("which", ["rabbitmq", "workers"])
def test_each_rules_object_carries_the_groups_promtool_tests(stack: str, which: str) -> None:
    config = load_stack_config(stack_config(stack), stack)
    args = monitoring.MonitoringArgs.from_stack(config, "celery")
    namespace, groups, alerts = {
        "rabbitmq": (config.rabbitmq.namespace, monitoring.rule_groups, monitoring.alerts),
        "workers": (
            config.workers.namespace,
            monitoring.worker_rule_groups,
            monitoring.worker_alerts,
        ),
    }[which]
    (rules,) = [r for r in _custom(stack, "Rules") if r["metadata"]["namespace"] == namespace]
    assert rules["apiVersion"] == "monitoring.googleapis.com/v1"
    assert rules["spec"] == {"groups": groups(args)}
    names = []
    for group in rules["spec"]["groups"]:
        assert set(group) <= GROUP and DURATION.match(group["interval"])
        for rule in group["rules"]:
            assert set(rule) <= RULE
            assert ("alert" in rule) != ("record" in rule), rule
            if "for" in rule:
                assert DURATION.match(rule["for"]), rule
            if "alert" in rule:
                names.append(rule["alert"])
                assert ALERT_NAME.match(rule["alert"])
                assert rule["labels"]["severity"] in ("critical", "warning")
                # A runbook line on every alert, the same as in the docs.
                assert len(rule["annotations"]["runbook"]) > 40, rule
    assert len(names) == len(set(names)) == len(alerts(args))


@pytest.mark.parametrize("stack", STACKS)
def test_the_gke_cluster_collects_with_managed_prometheus(stack: str) -> None:
    run = _run(stack)
    cluster = run.one("gcp:container/cluster:Cluster").inputs
    assert cluster["monitoringConfig"] == {
        "enableComponents": ["SYSTEM_COMPONENTS"],
        "managedPrometheus": {"enabled": True},
    }


def test_without_managed_prometheus_no_monitoring_object_is_made() -> None:
    raw = stack_config("dev")
    raw["celery-cluster:monitoring"] = {"managedPrometheus": False}
    run = run_program(raw, "dev")
    assert run.error is None, run.error
    kinds = {m["kind"] for _, m in run.kubernetes_objects()}
    assert not kinds & {"PodMonitoring", "Rules"}
    cluster = run.one("gcp:container/cluster:Cluster").inputs
    assert cluster["monitoringConfig"]["managedPrometheus"] == {"enabled": False}


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("scrapeIntervalSeconds", 1, "an integer from 5 to 300"),
        ("nodeDownSeconds", -1, "an integer from 0 to 3600"),
        ("workerDownSeconds", 3601, "an integer from 0 to 3600"),
        ("backlogWindowSeconds", 60, "an integer from 120 to 86400"),
        ("backlogWaitSeconds", "600", "an integer"),
        ("managedPrometheus", "yes", "true or false"),
    ],
)
def test_bad_monitoring_config_is_refused_by_key(key: str, value: Any, allowed: str) -> None:
    raw = stack_config("prod")
    raw["celery-cluster:monitoring"] = {key: value}
    with pytest.raises(ConfigError) as raised:
        load_stack_config(raw, "prod")
    message = str(raised.value)
    assert f"celery-cluster:monitoring.{key}" in message and allowed in message, message


def test_a_backlog_window_shorter_than_two_queue_scrapes_is_refused() -> None:
    raw = stack_config("prod")
    raw["celery-cluster:monitoring"] = {"scrapeIntervalSeconds": 60, "backlogWindowSeconds": 180}
    with pytest.raises(ConfigError, match=r"backlogWindowSeconds.*at least 4 x .*\(240\)"):
        load_stack_config(raw, "prod")


def test_the_alert_windows_follow_the_stack() -> None:
    raw = stack_config("prod")
    raw["celery-cluster:monitoring"] = {
        "nodeDownSeconds": 300,
        "workerDownSeconds": 90,
        "backlogWaitSeconds": 60,
    }
    raw["celery-cluster:workers"] = {**raw["celery-cluster:workers"], "longestTaskSeconds": 900}
    config = load_stack_config(raw, "prod")
    alerts = {
        a.name: a for a in monitoring.alerts(monitoring.MonitoringArgs.from_stack(config, "v"))
    }
    assert alerts["RabbitMQNodeDown"].for_seconds == 300
    worker_alerts = {
        a.name: a
        for a in monitoring.worker_alerts(monitoring.MonitoringArgs.from_stack(config, "v"))
    }
    assert worker_alerts["CeleryWorkerDown"].for_seconds == 90
    assert alerts["CeleryBacklogWaitHigh"].expr.endswith("> 60")
    # A 15-minute task may hold its message that long: twice that before "stuck".
    assert alerts["CeleryUnackedStuck"].for_seconds == 1800
    assert 'vhost="v"' in alerts["CeleryNoConsumer"].expr


def test_the_docs_carry_every_runbook_as_the_prod_stack_renders_it() -> None:
    from pathlib import Path

    docs = (Path(__file__).parents[2] / "docs" / "observability.md").read_text()
    config = load_stack_config(stack_config("prod"), "prod")
    args = monitoring.MonitoringArgs.from_stack(config, "celery")
    for alert in [*monitoring.alerts(args), *monitoring.worker_alerts(args)]:
        row = f"| `{alert.name}` | {alert.severity} |"
        assert row in docs, row
        assert alert.runbook in docs, alert.name
