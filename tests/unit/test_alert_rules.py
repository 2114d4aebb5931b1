"""The alert rules, tested by Prometheus itself: ``promtool test rules`` (Debian's
prometheus package, from its pinned root: ``make setup``) on the very groups the
``Rules`` object carries (components/monitoring.py: rule_groups), one test per alert:
it fires when it should, with its labels and runbook, and not before or otherwise.

Series carry the labels Managed Prometheus gives RabbitMQ's metrics (``job`` is the
PodMonitoring's name, ``pod`` the target's); the queue metrics are per vhost and queue.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from components import monitoring
from components.config import load_stack_config
from localcluster import rootfs
from tools.mockrun import stack_config

STACK = "prod"
INTERVAL = "30s"


def _args() -> monitoring.MonitoringArgs:
    config = load_stack_config(stack_config(STACK), STACK)
    return monitoring.MonitoringArgs.from_stack(config, "celery")


ARGS = _args()
ALERTS = {a.name: a for a in [*monitoring.alerts(ARGS), *monitoring.worker_alerts(ARGS)]}
POD = [f"rabbitmq-server-{i}" for i in range(ARGS.replicas)]
WORK = f'vhost="{ARGS.vhost}", queue="{ARGS.queue}"'
DEAD = f'vhost="{ARGS.vhost}", queue="{ARGS.dead_letter_queue}"'


def series(name: str, labels: str, values: str) -> dict[str, str]:
    return {"series": f"{name}{{{labels}}}", "values": values}


def firing(alert: str, value: str | None = None, **labels: str) -> dict[str, Any]:
    """What promtool must see: the alert's labels and its annotations, templated."""
    spec = ALERTS[alert]
    annotations = {"summary": spec.summary, "runbook": spec.runbook}
    if value is not None:
        annotations = {k: v.replace("{{ $value }}", value) for k, v in annotations.items()}
    for label, text in labels.items():
        annotations = {
            k: v.replace(f"{{{{ $labels.{label} }}}}", text) for k, v in annotations.items()
        }
    return {"exp_labels": {"severity": spec.severity, **labels}, "exp_annotations": annotations}


def rule_file(tmp: Path) -> Path:
    """The groups the Rules object carries, as a Prometheus rule file."""
    rules = tmp / "rules.yaml"
    groups = [*monitoring.rule_groups(ARGS), *monitoring.worker_rule_groups(ARGS)]
    rules.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return rules


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(rootfs.promtool()), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def check(
    alert: str,
    name: str,
    inputs: list[dict[str, str]],
    expect: list[tuple[str, list[dict[str, Any]]]],
    tmp: Path,
) -> None:
    """Run one promtool test: ``expect`` is [(eval_time, the alerts firing then)]."""
    rules = rule_file(tmp)
    test = {
        "rule_files": [rules.name],
        "evaluation_interval": INTERVAL,
        "tests": [
            {
                "name": name,
                "interval": INTERVAL,
                "input_series": inputs,
                "alert_rule_test": [
                    {"eval_time": at, "alertname": alert, "exp_alerts": alerts}
                    for at, alerts in expect
                ],
            }
        ],
    }
    path = tmp / "test.yaml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    done = promtool("test", "rules", str(path), cwd=tmp)
    assert done.returncode == 0, f"promtool test rules {name}:\n{done.stdout}\n{done.stderr}"


def test_the_rule_file_is_valid_for_prometheus(tmp_path: Path) -> None:
    done = promtool("check", "rules", str(rule_file(tmp_path)), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(ALERTS) + len(monitoring.recording_rules(ARGS))} rules found" in (
        done.stdout
    )
    assert len(monitoring.worker_alerts(ARGS)) == 4


def test_a_rabbitmq_pod_that_stops_answering_pages_after_the_grace(tmp_path: Path) -> None:
    # pod 2 stops answering its scrape at 2m; node_down_seconds (prod: 2m) later, the page.
    inputs = [series("up", f'job="rabbitmq", pod="{p}"', "1x40") for p in POD[:2]]
    inputs.append(series("up", f'job="rabbitmq", pod="{POD[2]}"', "1x3 0x36"))
    assert ALERTS["RabbitMQNodeDown"].for_seconds == 120
    check(
        "RabbitMQNodeDown",
        "node down",
        inputs,
        [("1m", []), ("3m", []), ("5m", [firing("RabbitMQNodeDown")])],
        tmp_path,
    )


def test_no_rabbitmq_pod_answering_at_all_pages_too(tmp_path: Path) -> None:
    inputs = [series("up", f'job="rabbitmq", pod="{p}"', "0x20") for p in POD]
    check("RabbitMQNodeDown", "all down", inputs, [("5m", [firing("RabbitMQNodeDown")])], tmp_path)


def test_a_node_cut_off_from_its_peers_pages(tmp_path: Path) -> None:
    inputs = [series("rabbitmq_unreachable_cluster_peers_count", f'pod="{p}"', "0x40") for p in POD]
    inputs[1] = series("rabbitmq_unreachable_cluster_peers_count", f'pod="{POD[1]}"', "0x3 2x36")
    check(
        "RabbitMQNodeNotClustered",
        "not clustered",
        inputs,
        [("3m", []), ("5m", [firing("RabbitMQNodeNotClustered", "2", pod=POD[1])])],
        tmp_path,
    )


@pytest.mark.parametrize(
    ("alert", "metric"),
    [
        ("RabbitMQMemoryAlarm", "rabbitmq_alarms_memory_used_watermark"),
        ("RabbitMQDiskAlarm", "rabbitmq_alarms_free_disk_space_watermark"),
    ],
)
def test_a_resource_alarm_pages_at_once_and_resolves_with_it(
    alert: str, metric: str, tmp_path: Path
) -> None:
    inputs = [series(metric, f'pod="{p}"', "0x10") for p in POD]
    inputs[0] = series(metric, f'pod="{POD[0]}"', "0 0 1 1 0x6")  # raised at 1m, cleared 2m
    check(
        alert,
        alert,
        inputs,
        [("30s", []), ("1m", [firing(alert, pod=POD[0])]), ("2m30s", [])],
        tmp_path,
    )


def test_a_backlog_that_keeps_growing_warns_after_the_window(tmp_path: Path) -> None:
    window = ARGS.monitoring.backlog_window_seconds  # prod: 15m
    assert window == 900
    # +10 ready messages every 30 s, on the queue leader's pod only.
    inputs = [
        series("rabbitmq_detailed_queue_messages_ready", f'{WORK}, pod="{POD[0]}"', "0+10x80")
    ]
    check(
        "CeleryBacklogGrowing",
        "backlog growing",
        inputs,
        [("10m", []), ("17m", [firing("CeleryBacklogGrowing", "340")])],
        tmp_path,
    )


def test_a_large_but_steady_backlog_is_not_growing(tmp_path: Path) -> None:
    inputs = [series("rabbitmq_detailed_queue_messages_ready", f'{WORK}, pod="{POD[0]}"', "500x80")]
    check("CeleryBacklogGrowing", "steady backlog", inputs, [("20m", [])], tmp_path)


def test_a_backlog_that_would_take_too_long_to_drain_warns(tmp_path: Path) -> None:
    # 10,000 ready, 1 ack a second: a new task waits ~10,000 s (prod limit: 600 s).
    slow = [
        series("rabbitmq_detailed_queue_messages_ready", f'{WORK}, pod="{POD[0]}"', "10000x40"),
        series(
            "rabbitmq_detailed_queue_messages_acked_total", f'{WORK}, pod="{POD[0]}"', "0+30x40"
        ),
    ]
    check(
        "CeleryBacklogWaitHigh",
        "slow drain",
        slow,
        [("3m", []), ("12m", [firing("CeleryBacklogWaitHigh")])],
        tmp_path,
    )
    # The same backlog at 100 acks a second drains in 100 s: no alert.
    fast = [
        slow[0],
        series(slow[1]["series"].split("{")[0], f'{WORK}, pod="{POD[0]}"', "0+3000x40"),
    ]
    check("CeleryBacklogWaitHigh", "fast drain", fast, [("12m", [])], tmp_path)


def test_a_dead_lettered_task_warns(tmp_path: Path) -> None:
    inputs = [series("rabbitmq_detailed_queue_messages", f'{DEAD}, pod="{POD[1]}"', "0 0 3x10")]
    check(
        "CeleryDeadLetters",
        "dead letters",
        inputs,
        [("30s", []), ("2m", [firing("CeleryDeadLetters", "3")])],
        tmp_path,
    )


def test_a_queue_nobody_consumes_pages(tmp_path: Path) -> None:
    inputs = [series("rabbitmq_detailed_queue_consumers", f'{WORK}, pod="{POD[0]}"', "3x3 0x20")]
    check(
        "CeleryNoConsumer",
        "no consumer",
        inputs,
        [("2m", []), ("5m", [firing("CeleryNoConsumer")])],
        tmp_path,
    )


def test_unacked_tasks_without_any_ack_warn(tmp_path: Path) -> None:
    stuck = ALERTS["CeleryUnackedStuck"].for_seconds
    assert stuck == 600  # prod: longest task 10 s, so the 10-minute floor
    unacked = series("rabbitmq_detailed_queue_messages_unacked", f'{WORK}, pod="{POD[0]}"', "5x60")
    flat = series(
        "rabbitmq_detailed_queue_messages_acked_total", f'{WORK}, pod="{POD[0]}"', "42x60"
    )
    check(
        "CeleryUnackedStuck",
        "stuck",
        [unacked, flat],
        [("8m", []), ("13m", [firing("CeleryUnackedStuck", "5")])],
        tmp_path,
    )
    moving = series(
        "rabbitmq_detailed_queue_messages_acked_total", f'{WORK}, pod="{POD[0]}"', "0+5x60"
    )
    check("CeleryUnackedStuck", "moving", [unacked, moving], [("20m", [])], tmp_path)


# --- the workers' own counters (app/metrics.py) ------------------------------------

WORKER = 'job="celery-workers", pod="celery-worker-0"'
TASK = "app.tasks.count"


def test_a_worker_that_stops_answering_warns(tmp_path: Path) -> None:
    inputs = [series("up", WORKER, "1x3 0x20")]
    expect = firing("CeleryWorkerDown", job="celery-workers", pod="celery-worker-0")
    check("CeleryWorkerDown", "worker down", inputs, [("4m", []), ("8m", [expect])], tmp_path)


@pytest.mark.parametrize("failed_per_step", [1, 0])
def test_tasks_that_keep_failing_warn(failed_per_step: int, tmp_path: Path) -> None:
    # 10 started every 30 s; 1 of them fails (10 % > 5 %), or none does.
    inputs = [
        series("celery_tasks_started_total", f'{WORKER}, task="{TASK}"', "0+10x60"),
        series("celery_tasks_failed_total", f'{WORKER}, task="{TASK}"', f"0+{failed_per_step}x60"),
    ]
    expect = [firing("CeleryTasksFailing", task=TASK)] if failed_per_step else []
    check("CeleryTasksFailing", "failing", inputs, [("5m", []), ("25m", expect)], tmp_path)


@pytest.mark.parametrize("redelivered_per_step", [2, 0])
def test_tasks_delivered_again_and_again_warn(redelivered_per_step: int, tmp_path: Path) -> None:
    inputs = [
        series("celery_tasks_received_total", f'{WORKER}, task="{TASK}"', "0+10x80"),
        series(
            "celery_tasks_redelivered_total",
            f'{WORKER}, task="{TASK}"',
            f"0+{redelivered_per_step}x80",
        ),
    ]
    expect = [firing("CeleryTasksRedelivered")] if redelivered_per_step else []
    check("CeleryTasksRedelivered", "redelivered", inputs, [("10m", []), ("35m", expect)], tmp_path)


@pytest.mark.parametrize("slow", [True, False])
def test_tasks_running_past_the_longest_task_budget_warn(slow: bool, tmp_path: Path) -> None:
    # 10 tasks every 30 s, all between 10 and 30 s (over prod's 10 s budget) or under 5 s.
    assert ARGS.longest_task_seconds == 10
    under = "0+0x80" if slow else "0+10x80"
    inputs = [
        series("celery_task_runtime_seconds_bucket", f'{WORKER}, task="{TASK}", le="{le}"', v)
        for le, v in (("5", under), ("10", under), ("30", "0+10x80"), ("+Inf", "0+10x80"))
    ]
    expect = [firing("CeleryTaskRuntimeOverBudget", task=TASK)] if slow else []
    check(
        "CeleryTaskRuntimeOverBudget",
        "runtime",
        inputs,
        [("10m", []), ("35m", expect)],
        tmp_path,
    )


def test_every_alert_has_a_test_here() -> None:
    text = Path(__file__).read_text()
    untested = [name for name in ALERTS if f'"{name}"' not in text.split("def test_every")[0]]
    assert untested == []
