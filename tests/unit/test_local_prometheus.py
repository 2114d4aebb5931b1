"""The run's Prometheus (localcluster/prometheus.py), without starting it: what it scrapes
(the rendered PodMonitorings, mirrored), the rules it evaluates (rule_groups at the
twin's size, accepted by promtool), and when alerts fired, from the query API's answer.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from components import monitoring
from components.config import MonitoringConfig
from localcluster import prometheus, rootfs
from localcluster.prometheus import AlertInterval, alert_intervals
from tools.mockrun import ProgramRun, reveal

STACK = "prod"
ADDRESSES = ["10.244.9.2", "10.244.9.3", "10.244.9.4"]


def _rendered(runs: dict[str, ProgramRun]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The prod stack's StatefulSet and the PodMonitorings of its namespace (the session's
    run under mocks). The workers' PodMonitoring is not mirrored: the twin's Prometheus
    scrapes RabbitMQ (the worker metrics: tests/integration/test_metrics_endpoint.py)."""
    objects = [reveal(m) for _, m in runs[STACK].kubernetes_objects()]
    (statefulset,) = [o for o in objects if o["kind"] == "StatefulSet"]
    namespace = statefulset["metadata"]["namespace"]
    return statefulset, [
        o
        for o in objects
        if o["kind"] == "PodMonitoring" and o["metadata"]["namespace"] == namespace
    ]


def _args() -> tuple[monitoring.MonitoringArgs, MonitoringConfig]:
    return prometheus.monitoring_args(STACK, {}, "celery")


def test_it_scrapes_what_the_rendered_pod_monitorings_say(
    stack_runs: dict[str, ProgramRun],
) -> None:
    statefulset, rendered = _rendered(stack_runs)
    args, _ = _args()
    scraped = prometheus.statefulset_pods(statefulset, ADDRESSES)
    # The twin's PodMonitorings are the rendered ones but for their intervals.
    ours = prometheus.pod_monitorings(args)
    strip = [{**pm["spec"]["endpoints"][0], "interval": None} for pm in ours]
    assert strip == [{**pm["spec"]["endpoints"][0], "interval": None} for pm in rendered]
    jobs = {j["job_name"]: j for j in prometheus.scrape_configs(ours, scraped)}
    assert set(jobs) == {monitoring.METRICS_JOB, monitoring.QUEUES_JOB}
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    port = ports[monitoring.PROMETHEUS_PORT_NAME]
    for pm in rendered:
        job = jobs[pm["metadata"]["name"]]
        (endpoint,) = pm["spec"]["endpoints"]
        assert job["metrics_path"] == endpoint["path"]
        assert job.get("params") == endpoint.get("params")
        targets = [(c["targets"], c["labels"]) for c in job["static_configs"]]
        assert targets == [
            (
                [f"{address}:{port}"],
                {
                    "namespace": "rabbitmq",
                    "pod": f"rabbitmq-server-{i}",
                    "container": container["name"],
                    "instance": f"rabbitmq-server-{i}:{monitoring.PROMETHEUS_PORT_NAME}",
                },
            )
            for i, address in enumerate(ADDRESSES)
        ]
    # Every second, the per-queue endpoint every other time, as the stack's ratio.
    assert jobs[monitoring.METRICS_JOB]["scrape_interval"] == "1s"
    assert jobs[monitoring.QUEUES_JOB]["scrape_interval"] == "2s"
    assert all(j["scrape_timeout"] == j["scrape_interval"] for j in jobs.values())


def test_a_pod_monitoring_that_selects_nothing_or_no_port_is_refused(
    stack_runs: dict[str, ProgramRun],
) -> None:
    statefulset, rendered = _rendered(stack_runs)
    scraped = prometheus.statefulset_pods(statefulset, ADDRESSES)
    other = {
        **rendered[0],
        "spec": {**rendered[0]["spec"], "selector": {"matchLabels": {"a": "b"}}},
    }
    with pytest.raises(prometheus.PrometheusError, match=r"selects \{'a': 'b'\}: no pod"):
        prometheus.scrape_configs([other], scraped)
    endpoint = {**rendered[0]["spec"]["endpoints"][0], "port": "nope"}
    other = {**rendered[0], "spec": {**rendered[0]["spec"], "endpoints": [endpoint]}}
    with pytest.raises(prometheus.PrometheusError, match="have no port 'nope'"):
        prometheus.scrape_configs([other], scraped)


def test_the_rules_are_the_stacks_at_the_twins_size() -> None:
    args, stack_monitoring = _args()
    assert args.monitoring == prometheus.twin_monitoring(stack_monitoring)
    assert args.monitoring.scrape_interval_seconds == 1
    assert args.monitoring.node_down_seconds == 2
    (group,) = yaml.safe_load(prometheus.rule_file(args))["groups"]
    assert group["interval"] == "1s"
    rules = {r.get("alert") or r["record"]: r for r in group["rules"]}
    assert rules["RabbitMQNodeDown"]["for"] == "2s"
    # Everything else as the stack renders it.
    stack_args = monitoring.MonitoringArgs(**{**args.__dict__, "monitoring": stack_monitoring})
    (stack_group,) = monitoring.rule_groups(stack_args)
    for rule in stack_group["rules"]:
        ours = rules[rule.get("alert") or rule["record"]]
        assert ours["expr"] == rule["expr"]
        if rule.get("alert") not in ("RabbitMQNodeDown", "RabbitMQNodeNotClustered"):
            assert ours.get("for") == rule.get("for"), rule
    words = prometheus.twin_adaptation(stack_monitoring, args.monitoring)
    assert "scrape_interval_seconds 30 -> 1" in words and "node_down_seconds 120 -> 2" in words


def test_promtool_accepts_the_config_and_its_rules(
    tmp_path: Path, stack_runs: dict[str, ProgramRun]
) -> None:
    statefulset, _ = _rendered(stack_runs)
    args, _ = _args()
    rules = tmp_path / "rules.yml"
    rules.write_text(prometheus.rule_file(args))
    config = tmp_path / "prometheus.yml"
    config.write_text(
        prometheus.prometheus_config(
            prometheus.pod_monitorings(args),
            prometheus.statefulset_pods(statefulset, ADDRESSES),
            1,
            rule_path=str(rules),
        )
    )
    done = subprocess.run(
        [str(rootfs.promtool()), "check", "config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def _series(alert: str, times: list[float], **labels: str) -> dict[str, Any]:
    metric = {
        "__name__": "ALERTS",
        "alertname": alert,
        "alertstate": "firing",
        "severity": "critical",
        **labels,
    }
    return {"metric": metric, "values": [[t, "1"] for t in times]}


def test_alert_intervals_from_the_firing_samples() -> None:
    series = [
        # Fired at 10, last seen firing at 14: resolved at the next evaluation, 15; then
        # fired again at 30 and still firing.
        _series("RabbitMQNodeDown", [10, 11, 12, 13, 14, 30, 31]),
        # A per-pod alert: its pod label is its own.
        _series("RabbitMQNodeNotClustered", [12, 13], pod="rabbitmq-server-0"),
        _series("Empty", []),
    ]
    now = [{"alertname": "RabbitMQNodeDown", "alertstate": "firing", "severity": "critical"}]
    found = alert_intervals(series, 1.0, now)
    assert found == [
        AlertInterval("RabbitMQNodeDown", "critical", {}, 10.0, 15.0),
        AlertInterval(
            "RabbitMQNodeNotClustered", "critical", {"pod": "rabbitmq-server-0"}, 12.0, 14.0
        ),
        AlertInterval("RabbitMQNodeDown", "critical", {}, 30.0, None),
    ]
    # Not firing any more: the last stretch resolved too. A late evaluation (2 s) is not
    # a new stretch.
    (one,) = alert_intervals([_series("A", [1, 2, 4, 5])], 1.0)
    assert (one.fired, one.resolved) == (1.0, 6.0)
