"""The worker's metrics (app/metrics.py): each signal receiver counts what it should,
and the endpoint serves the series; the settings refuse a port prefork cannot serve.
(The Deployment's pods serving them under real tasks: tests/integration/
test_metrics_endpoint.py.)"""

from __future__ import annotations

import socket
import urllib.request
from types import SimpleNamespace

import pytest

from app.metrics import WorkerMetrics
from app.settings import SettingsError, WorkerSettings

TASK = SimpleNamespace(name="app.tasks.count")
LABELS = {"task": "app.tasks.count"}


def _value(metrics: WorkerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {**LABELS, **labels})


def test_each_signal_counts_once_and_runtime_is_observed() -> None:
    metrics = WorkerMetrics()
    first = SimpleNamespace(name=TASK.name, delivery_info={"redelivered": False})
    again = SimpleNamespace(name=TASK.name, delivery_info={"redelivered": True})
    metrics.on_received(request=first)
    metrics.on_received(request=again)
    metrics.on_prerun(task_id="a", task=TASK)
    metrics.on_prerun(task_id="b", task=TASK)
    assert _value(metrics, "celery_tasks_running") == 2
    metrics.on_success(sender=TASK)
    metrics.on_postrun(task_id="a", task=TASK)
    metrics.on_retry(sender=TASK)
    metrics.on_failure(sender=TASK)
    metrics.on_postrun(task_id="b", task=TASK)
    metrics.on_postrun(task_id="never-started", task=TASK)  # no double count
    assert _value(metrics, "celery_tasks_received_total") == 2
    assert _value(metrics, "celery_tasks_redelivered_total") == 1
    assert _value(metrics, "celery_tasks_started_total") == 2
    assert _value(metrics, "celery_tasks_succeeded_total") == 1
    assert _value(metrics, "celery_tasks_failed_total") == 1
    assert _value(metrics, "celery_tasks_retried_total") == 1
    assert _value(metrics, "celery_tasks_running") == 0
    assert _value(metrics, "celery_task_runtime_seconds_count") == 2


def test_the_endpoint_serves_the_series() -> None:
    metrics = WorkerMetrics()
    metrics.on_prerun(task_id="a", task=TASK)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    metrics.serve(port)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        page = response.read().decode()
    assert 'celery_tasks_started_total{task="app.tasks.count"} 1.0' in page
    assert "# TYPE celery_task_runtime_seconds histogram" in page


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"CELERY_METRICS_PORT": "70000"}, "CELERY_METRICS_PORT='70000'"),
        ({"CELERY_METRICS_PORT": "x"}, "CELERY_METRICS_PORT='x'"),
        ({"CELERY_METRICS_PORT": "9808", "CELERY_POOL": "prefork"}, "0 with the prefork pool"),
    ],
)
def test_a_metrics_port_that_cannot_work_is_refused(env: dict[str, str], fragment: str) -> None:
    base = {"CELERY_BROKER_URLS": "amqp://u:p@h:5672/celery", "HOSTNAME": "w"}
    with pytest.raises(SettingsError, match=fragment.replace("(", r"\(")):
        WorkerSettings.from_env({**base, **env})
    assert WorkerSettings.from_env({**base, "CELERY_METRICS_PORT": "9808"}).metrics_port == 9808
