"""The run's Prometheus (localcluster/prometheus.py), without starting it: what it scrapes
(the rendered PodMonitorings, RabbitMQ's and the workers', mirrored), the rules it
evaluates (rule_groups and worker_rule_groups at the twin's size, accepted by promtool),
and when alerts fired, from the query API's answer.
"""

from __future__ import annotations

import dataclasses
import json
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
WORKER_ADDRESSES = {"celery-worker-0": "10.244.9.5", "celery-worker-1": "10.244.9.6"}


def _rendered(runs: dict[str, ProgramRun]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The prod stack's StatefulSet and the PodMonitorings of its namespace (the session's
    run under mocks)."""
    statefulset, _, monitorings = _rendered_all(runs)
    namespace = statefulset["metadata"]["namespace"]
    return statefulset, [m for m in monitorings if m["metadata"]["namespace"] == namespace]


def _rendered_all(
    runs: dict[str, ProgramRun],
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """The prod stack's StatefulSet, worker Deployment and every PodMonitoring."""
    objects = [reveal(m) for _, m in runs[STACK].kubernetes_objects()]
    (statefulset,) = [o for o in objects if o["kind"] == "StatefulSet"]
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    return statefulset, deployment, [o for o in objects if o["kind"] == "PodMonitoring"]


def _scraped(runs: dict[str, ProgramRun]) -> list[prometheus.ScrapedPod]:
    statefulset, deployment, _ = _rendered_all(runs)
    return [
        *prometheus.statefulset_pods(statefulset, ADDRESSES),
        *prometheus.deployment_pods(deployment, WORKER_ADDRESSES),
    ]


def _without_interval(pod_monitoring: dict[str, Any]) -> dict[str, Any]:
    """What a job mirrors of a PodMonitoring: all of it but the endpoint's interval."""
    (endpoint,) = pod_monitoring["spec"]["endpoints"]
    return {
        "name": pod_monitoring["metadata"]["name"],
        "namespace": pod_monitoring["metadata"]["namespace"],
        "selector": pod_monitoring["spec"]["selector"],
        "endpoint": {**endpoint, "interval": None},
    }


def _args() -> tuple[monitoring.MonitoringArgs, MonitoringConfig]:
    return prometheus.monitoring_args(STACK, {}, "celery")


def test_it_scrapes_what_the_rendered_pod_monitorings_say(
    stack_runs: dict[str, ProgramRun],
) -> None:
    statefulset, rendered = _rendered(stack_runs)
    _, _, every_rendered = _rendered_all(stack_runs)
    args, _ = _args()
    scraped = _scraped(stack_runs)
    # The twin's PodMonitorings are the rendered ones, the workers' too, but for their
    # intervals.
    ours = prometheus.pod_monitorings(args)
    assert sorted(map(_without_interval, ours), key=str) == sorted(
        map(_without_interval, every_rendered), key=str
    )
    assert len(ours) == 3
    jobs = {j["job_name"]: j for j in prometheus.scrape_configs(ours, scraped)}
    assert set(jobs) == {monitoring.METRICS_JOB, monitoring.QUEUES_JOB, monitoring.WORKERS_JOB}
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


def test_it_scrapes_the_worker_pods_the_run_names(stack_runs: dict[str, ProgramRun]) -> None:
    """The workers' job: the rendered PodMonitoring's port and path, one target per worker
    pod in the Deployment's namespace, labelled as the RabbitMQ targets are; from a file
    the run rewrites as its worker pods come and go (a replacement has a new name)."""
    _, deployment, rendered = _rendered_all(stack_runs)
    args, _ = _args()
    (worker_monitoring,) = [pm for pm in rendered if pm["metadata"]["name"] == "celery-workers"]
    (endpoint,) = worker_monitoring["spec"]["endpoints"]
    path = "/etc/prometheus/celery-workers.json"
    jobs = {
        j["job_name"]: j
        for j in prometheus.scrape_configs(
            prometheus.pod_monitorings(args), _scraped(stack_runs), {"celery-workers": path}
        )
    }
    job = jobs["celery-workers"]
    assert job["metrics_path"] == endpoint["path"] == "/metrics"
    assert (job["scrape_interval"], job["scrape_timeout"]) == ("1s", "1s")
    assert job["file_sd_configs"] == [{"files": [path], "refresh_interval": "1s"}]
    assert "static_configs" not in job
    # The RabbitMQ jobs keep their static targets (a StatefulSet's pods keep their names).
    assert "static_configs" in jobs["rabbitmq"] and "file_sd_configs" not in jobs["rabbitmq"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[endpoint["port"]] == 9808
    namespace = deployment["metadata"]["namespace"]
    assert namespace == worker_monitoring["metadata"]["namespace"] == "workers"
    pods = prometheus.deployment_pods(deployment, {"celery-worker-0r": "10.244.9.7"})
    assert json.loads(prometheus.target_file(worker_monitoring, pods)) == [
        {
            "targets": ["10.244.9.7:9808"],
            "labels": {
                "namespace": namespace,
                "pod": "celery-worker-0r",
                "container": container["name"],
                "instance": "celery-worker-0r:metrics",
            },
        }
    ]
    # Before any worker pod is Ready: no target, not an error.
    assert json.loads(prometheus.target_file(worker_monitoring, [])) == []
    # A RabbitMQ pod is not a worker: the selector and namespace keep it out.
    statefulset, _, _ = _rendered_all(stack_runs)
    rabbit = prometheus.statefulset_pods(statefulset, ADDRESSES)
    assert json.loads(prometheus.target_file(worker_monitoring, rabbit)) == []


def test_no_worker_job_nor_rules_without_worker_metrics() -> None:
    args, _ = _args()
    prefork = dataclasses.replace(args, worker_metrics=False)
    names = [pm["metadata"]["name"] for pm in prometheus.pod_monitorings(prefork)]
    assert names == [monitoring.METRICS_JOB, monitoring.QUEUES_JOB]
    groups = yaml.safe_load(prometheus.rule_file(prefork))["groups"]
    assert [g["name"] for g in groups] == ["celery-cluster"]


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
    assert args.monitoring.worker_down_seconds == 2
    groups = yaml.safe_load(prometheus.rule_file(args))["groups"]
    # RabbitMQ's group and the workers' (two Rules objects on GKE, one file here).
    assert [g["name"] for g in groups] == ["celery-cluster", "celery-workers"]
    assert all(g["interval"] == "1s" for g in groups)
    rules = {r.get("alert") or r["record"]: r for g in groups for r in g["rules"]}
    assert rules["RabbitMQNodeDown"]["for"] == "2s"
    assert rules["CeleryWorkerDown"]["for"] == "2s"
    # Everything else as the stack renders it (the other worker alerts keep their
    # 10-15 min: they cannot fire during a run).
    stack_args = monitoring.MonitoringArgs(**{**args.__dict__, "monitoring": stack_monitoring})
    stack_rules = [
        rule
        for group in [
            *monitoring.rule_groups(stack_args),
            *monitoring.worker_rule_groups(stack_args),
        ]
        for rule in group["rules"]
    ]
    assert len(stack_rules) == len(rules)
    resized = ("RabbitMQNodeDown", "RabbitMQNodeNotClustered", "CeleryWorkerDown")
    for rule in stack_rules:
        ours = rules[rule.get("alert") or rule["record"]]
        assert ours["expr"] == rule["expr"]
        if rule.get("alert") not in resized:
            assert ours.get("for") == rule.get("for"), rule
    assert rules["CeleryTasksRedelivered"]["for"] == "15m"
    words = prometheus.twin_adaptation(stack_monitoring, args.monitoring)
    assert "scrape_interval_seconds 30 -> 1" in words and "node_down_seconds 120 -> 2" in words
    assert "worker_down_seconds 300 -> 2" in words


def test_promtool_accepts_the_config_and_its_rules(
    tmp_path: Path, stack_runs: dict[str, ProgramRun]
) -> None:
    _, deployment, _ = _rendered_all(stack_runs)
    args, _ = _args()
    rules = tmp_path / "rules.yml"
    rules.write_text(prometheus.rule_file(args))
    targets = tmp_path / "celery-workers.json"
    targets.write_text(
        prometheus.target_file(
            monitoring.worker_pod_monitoring(args),
            prometheus.deployment_pods(deployment, WORKER_ADDRESSES),
        )
    )
    config = tmp_path / "prometheus.yml"
    config.write_text(
        prometheus.prometheus_config(
            prometheus.pod_monitorings(args),
            _scraped(stack_runs),
            1,
            rule_path=str(rules),
            target_files={monitoring.WORKERS_JOB: str(targets)},
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
