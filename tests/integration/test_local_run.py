"""``python -m localcluster`` (``make local``) on the pod twin, end to end, every fault.

The prod stack's own rendered StatefulSet (RabbitMQ 4.3.6 pods), worker Deployment
and scheduler Job as pods, at a small size (120 tasks of 10 x 0.2 s on 3 worker pods
x 10 threads, the fault after 60 completions, the broken part back after 1 s). The
CLI runs as a subprocess, as ``make local`` runs it, for its default fault and for
Ctrl-C; every other fault is a batch of its own on one booted run (the same library).
After each run nothing of it is left: no process, network namespace, cgroup, mount
or file of its run id (its Prometheus pod's included). The default fault's run also
checks what its Prometheus saw: RabbitMQNodeDown fired after the kill and resolved;
worker-kill's: CeleryWorkerDown fired for the killed worker pod and resolved.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from localcluster import podnet, pods, twin
from localcluster.console import Console
from localcluster.report import build_report
from localcluster.run import LocalRun, parse_args

REPO_ROOT = Path(__file__).resolve().parents[2]
TASKS = 120
STEP_SECONDS = 0.2  # a task runs 2 s

# failover_gap_s: the longest stretch with no task completing, from the fault on.
# Measured on the twin (2 cores), after the workers stopped running mingle (it held
# a reconnected consumer ~22 s): broker-kill 2.1 s, worker-kill 1.9 s, partition
# 2.7 s at this size, i.e. the rhythm of the work itself: 30 threads start 2 s tasks
# together, so completions come in waves ~2 s apart.
# Bound: one task (2 s) plus 6 s for the failover on pods (reconnect, quorum-queue
# leader election, redelivery), with the node's replacement booting beside it.
GAP_BOUND_S = 8.0


def cli(out: Path, fault: str, timeout: float = 180, *extra: str) -> list[str]:
    """The command `make local` runs, at this file's size (``extra`` last: it wins)."""
    return [
        sys.executable,
        "-m",
        "localcluster",
        "--fault",
        fault,
        "--tasks",
        str(TASKS),
        "--task-seconds",
        str(STEP_SECONDS),
        "--fault-at",
        "0.5",
        "--down-seconds",
        "1",
        "--timeout",
        str(timeout),
        "--out",
        str(out),
        *extra,
    ]


def run_local(
    out: Path, fault: str, timeout: float = 180, *extra: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    proc = subprocess.run(
        cli(out, fault, timeout, *extra),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=2 * timeout + 120,
        check=False,
    )
    report_file = out / "report.json"
    assert report_file.exists(), f"no report (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc, json.loads(report_file.read_text())


def nothing_left(run_id: str) -> None:
    """Not a process, namespace, cgroup, mount or file of the run is left."""
    assert not list(podnet.NETNS_DIR.glob(f"lc{run_id}-*"))
    for controller in pods.CONTROLLERS:
        assert not pods.run_cgroup(controller, run_id).exists()
    with open("/proc/mounts") as mounts:
        assert not [line for line in mounts if run_id in line]
    assert not (twin.RUNS_DIR / run_id).exists()
    bridges = podnet.ip("-o", "link", "show").stdout
    assert f"lc{run_id}br" not in bridges


def check_fault(fault: str, report: dict[str, Any], tasks: int = TASKS) -> None:
    """What every fault's report must say, and what each one's own evidence must."""
    detail = report["fault_detail"]
    print(
        f"\nLOCAL-RUN {fault} submitted={report['submitted']} lost={report['lost']} "
        f"dup={report['duplicates']} gap={report['failover_gap_s']} "
        f"rejoin={report['rejoin_s']} down={report['down_s']} detail={detail}"
    )
    assert report["fault"] == fault
    assert report["submitted"] == tasks
    assert report["lost"] == 0, report["lost_ids"]
    assert report["completed_unique"] == tasks
    assert report["unexpected_ids"] == 0, report
    assert detail.get("in_flight_completed") == detail.get("in_flight")
    if fault == "machine-loss":
        # Silent: no reset, no FIN. Measured at this size on the twin with net_ticktime
        # 8 s: peers declared it down after ~9.5 s, the stall ~8 s, the scheduler's ~10 s
        # (RabbitMQ's defaults: 60 s, 46 s and 60 s). The first leader loss after a boot
        # has stalled longer, 15.4 s (make test, 2026-12-01) and 16.0 s (--repeat 3's
        # first run), past the peers' verdict; cause not established (docs/local.md).
        # Bounds with room for that and a loaded CI, far below the defaults'.
        assert detail["found_by"] == "the leader of quorum queue celery", detail
        assert detail["all_peers_declared_down_s"] < 14, detail
        assert detail["new_leader_s"] is not None and detail["new_leader_s"] < 14, detail
        assert report["failover_gap_s"] < 22, report
        assert report["scheduler_stall_s"] is not None and report["scheduler_stall_s"] < 22
    elif fault == "worker-machine-loss":
        # Frozen and silent: RabbitMQ finds out through missed heartbeats (3 s) and
        # redelivers what it held; bound: 10 s plus one task (2 s). Measured 7.8 s
        # (27.3 s with the 10 s heartbeat shipped before).
        assert detail["in_flight"] > 0, detail
        assert detail["in_flight_redelivered"] == detail["in_flight"], detail
        assert detail["redelivered_s"] is not None and detail["redelivered_s"] <= 12, detail
    elif fault == "cluster-restart":
        # Tasks were still queued when every broker was down: they survived it.
        assert detail["unfinished_when_stopped"] > 0, detail
        # The gap is the outage itself plus the workers' way back: kombu's reconnect
        # back-off (up to 10 s between rounds), redelivery and one 2 s task
        # (measured: gap 12.2-21.8 s for a 31-67 s outage).
        assert report["failover_gap_s"] < report["down_s"] + 14, report
    elif fault == "memory-pressure":
        # The pods' memory limits as shipped: the alarm fires below the limit, blocks the
        # publishers, is cleared once the flood is drained; no pod was OOM-killed or
        # restarted, and every message RabbitMQ confirmed was consumed.
        flood = detail["flood"]
        assert detail["alarm_s"] is not None and detail["blocked_s"] is not None, detail
        assert detail["cleared_s"] is not None and detail["cleared_s"] >= detail["alarm_s"]
        assert detail["oom_kills"] == [0, 0, 0] and detail["restarted"] == [False] * 3, detail
        for peak, threshold, limit in zip(
            detail["peak_rss_mib"],
            detail["alarm_threshold_mib"],
            detail["memory_limit_mib"],
            strict=True,
        ):
            assert threshold < limit and peak < limit, detail
        assert max(detail["peak_rss_mib"]) >= min(detail["alarm_threshold_mib"]) * 0.9, detail
        assert flood["confirmed"] > 0 and flood["confirmed_lost"] == 0, flood
        assert flood["consumed"] >= flood["confirmed"], flood
        # The flood saturates the nodes' write-ahead logs, which the task queue shares:
        # the workers stall until it stops (measured: 23.6 s, ending 3.5 s after the
        # publishers were blocked, 32 s into the flood). Bound: the work is back within
        # 15 s of the block.
        assert report["failover_gap_s"] < detail["blocked_s"] + 15, report
    elif fault == "broker-pause":
        # The queue's leader paused 4 s, under what net_ticktime 8 s takes for dead
        # (measured: 4, 6 and 8 s pauses never declared down, 10 and 12 s at ~9 s):
        # nobody took it for dead, nothing ran twice, the stall is the pause's.
        assert detail["found_by"] == "the leader of quorum queue celery", detail
        assert detail["taken_for_dead"] is False and detail["declared_down_s"] == {}, detail
        assert report["failover_gap_s"] < detail["paused_s"] + GAP_BOUND_S, report
    elif fault == "worker-pause":
        # Paused 2 s, under two missed 3 s AMQP heartbeats (measured: pauses of 2-6 s
        # never, 8 and 10 s always ran its tasks again): its tasks ran once.
        assert detail["in_flight"] > 0 and detail["survived"] is True, detail
        assert detail["redelivered_elsewhere_s"] is None, detail
        assert detail["in_flight_redelivered"] == 0, detail
        assert report["duplicates"] == 0, report
        assert report["failover_gap_s"] < GAP_BOUND_S, report
    elif fault == "pod0-volume-loss":
        # Its subject is the one cluster (below); its stall is a killed pod's, measured
        # 4.8 s and 8.8 s here (the second in a CI run): bounded as a lost machine's.
        assert report["failover_gap_s"] < 15, report
    else:
        assert report["failover_gap_s"] < GAP_BOUND_S, report
    if fault == "pod0-volume-loss":
        # One cluster of three afterwards, as every pod sees it (4.3.6 alone founds a
        # second one: the StatefulSet's start command makes pod 0 rejoin).
        assert detail["one_cluster"] is True, detail
        for seen in detail["running_nodes"].values():
            assert isinstance(seen, list) and len(seen) == 3, detail
    if fault in ("broker-kill", "partition"):
        assert detail["found_by"] == "its AMQP connection", detail
        assert detail["target"].startswith("rabbitmq-server-")
    if fault == "worker-kill":
        # SIGKILLed mid-task: what it was running ran again elsewhere.
        assert detail["in_flight"] > 0, detail
        assert detail["in_flight_redelivered"] == detail["in_flight"]
        assert report["duplicates"] >= detail["in_flight"]
        check_worker_down_alert(report)
    if fault == "worker-term":
        # Celery's warm shutdown: it finished and acked what it ran, and exited 0.
        assert detail["in_flight"] > 0, detail
        assert detail["exit_status"] == 0, detail
        assert detail["in_flight_redelivered"] == 0, detail
    if fault == "partition":
        # RabbitMQ 4.3 keeps its metadata in Khepri (Raft): no pause_minority any more.
        # The cut-off pod's peers drop it, it sees only itself, and it is back after
        # the heal (the run waits for that); nothing is lost either way.
        name = f"rabbit@{detail['target']}.rabbitmq-nodes.rabbitmq"
        assert name not in detail["majority_running_nodes"], detail
        assert len(detail["majority_running_nodes"]) == 2, detail
        assert detail["minority_running_nodes"] in ([name], []) or "unavailable" in str(
            detail["minority_running_nodes"]
        ), detail


def test_make_local_loses_nothing(tmp_path: Path) -> None:
    """`make local` itself, end to end: the CLI, its default fault, its files."""
    out = tmp_path / "out"
    proc, report = run_local(out, "broker-kill")
    twin_info = report["twin"]
    nothing_left(twin_info["run_id"])
    assert report["leftovers"] == {}
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert report["status"] == "ok" and report["problems"] == [], report["problems"]
    assert twin_info["stack"] == "prod" and twin_info["rabbitmq_version"].startswith("4.3.")
    assert "/etc/rabbitmq/rabbitmq.conf" in twin_info["mounted_files_sha256"]
    assert set(twin_info["adaptations"]) >= {
        "image",
        "PersistentVolumeClaim",
        "Service DNS",
        "Managed Prometheus",
    }
    check_fault("broker-kill", report)
    check_node_down_alert(report)
    # The workers lost a broker, not their metrics: no worker pod stopped answering.
    worker_down = [a for a in report["alerts"]["fired"] if a["alert"] == "CeleryWorkerDown"]
    assert worker_down == [], worker_down
    assert (out / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "logs" / "ledger.jsonl").exists()
    assert (out / "logs" / "prometheus.log").exists()


def check_worker_down_alert(report: dict[str, Any]) -> None:
    """The run's Prometheus (scrape and evaluation every 1 s, CeleryWorkerDown after 2 s,
    the twin's size) saw the killed worker pod: CeleryWorkerDown fired for it (its pod
    label) and resolved once Prometheus dropped its target, after its replacement was
    Ready (the run's target file; Prometheus' discovery applies it within 5 s).
    Measured at this size (2026-12-01, six runs: `--repeat 3` on one boot and this test
    three times): fired 2.2-3.7 s after the kill, resolved 3.8-6.1 s after the replacement
    was Ready (which was 21 s after the restart)."""
    alerts = report["alerts"]
    killed = report["fault_detail"]["target"]
    print(f"\nLOCAL-RUN alerts {alerts}")
    assert "error" not in alerts, alerts
    worker_down_for = alerts["worker_down_for_s"]
    down = [a for a in alerts["fired"] or [] if a["alert"] == "CeleryWorkerDown"]
    mine = [a for a in down if a["labels"].get("pod") == killed]
    assert len(mine) == 1, alerts
    (alert,) = mine
    assert alert["labels"]["job"] == "celery-workers", alert
    assert worker_down_for <= alert["fired_after_fault_s"] < worker_down_for + 6, alerts
    # Resolved once its target was gone: after the replacement was Ready, within the
    # discovery's 5 s and an evaluation (and a loaded machine's delays of them).
    assert alert["resolved_after_back_s"] is not None, alerts
    assert 0 <= alert["resolved_after_back_s"] < 10, alerts


def check_node_down_alert(report: dict[str, Any]) -> None:
    """The run's Prometheus (scrape and evaluation every 1 s, RabbitMQNodeDown after 2 s,
    the twin's size) saw the kill: RabbitMQNodeDown fired and resolved once the new pod's
    RabbitMQ answered its scrape. Measured at this size (2026-12-01, three runs): fired
    2.9, 3.3 and 3.5 s after the kill, resolved 9.5, 8.1 and 10.3 s after the restart
    (down 1 s, then RabbitMQ's boot), 16-17 s before the pod was back (Ready, clustered):
    its metrics answer before its startup probe (10 s period) passes."""
    alerts = report["alerts"]
    print(f"\nLOCAL-RUN alerts {alerts}")
    assert "error" not in alerts, alerts
    node_down_for = alerts["node_down_for_s"]
    down = [a for a in alerts["fired"] or [] if a["alert"] == "RabbitMQNodeDown"]
    assert down, alerts
    # Not before its `for` (the first failed scrape comes after the kill); within a scrape,
    # an evaluation and a loaded machine's delays of it.
    assert node_down_for <= down[0]["fired_after_fault_s"] < node_down_for + 6, alerts
    # Resolved, and only after the new pod was started.
    for a in down:
        assert a["resolved_after_restart_s"] is not None, alerts
        assert a["resolved_after_restart_s"] > 0, alerts


def wait_until_resolved(run: LocalRun, alert: str, pod: str, timeout: float = 30) -> None:
    """Until the run's Prometheus has ``alert`` for ``pod`` resolved, or ``timeout``
    (the check that follows says what it found)."""
    assert run.prometheus is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [
            a
            for a in run.prometheus.alerts(run.marks["publish"])
            if a.alert == alert and a.labels.get("pod") == pod
        ]
        if found and all(a.resolved is not None for a in found):
            return
        time.sleep(1)


# Every other fault runs as a batch of its own on ONE booted run (the library the CLI
# is a front of: LocalRun.boot once, LocalRun.batch per fault), not a boot per fault:
# ~40 s of boot each is what `make test` cannot afford seven times.
BOOT_ARGS = ["--tasks", str(TASKS), "--task-seconds", str(STEP_SECONDS), "--timeout", "180"]


@pytest.fixture(scope="module")
def booted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRun]:
    out = tmp_path_factory.mktemp("local-batches")
    run = LocalRun(parse_args([*BOOT_ARGS, "--out", str(out)]), Console("test"))
    try:
        run.boot()
        yield run
    finally:
        problems = run.close(failed=False)
        assert run.twin is not None
        run_id = run.twin.run_id
        nothing_left(run_id)
        assert problems == [], problems


# (fault, its options): the whole cluster's graceful stop (preStop: drain on every pod)
# took 6-26 s and the workers go on meanwhile, so cluster-restart keeps ~30 s of work
# queued (600 tasks, fault after 120); machine-loss has the scheduler still publishing
# when the queue's leader vanishes (10 tasks/s for 24 s), gone for 20 s.
BATCHES = {
    "worker-kill": (),
    "worker-term": (),
    "cluster-restart": ("--tasks", "600", "--fault-at", "0.2"),
    "partition": (),
    "machine-loss": (
        *("--tasks", "240", "--rate", "10", "--fault-at", "0.25"),
        *("--target", "leader", "--down-seconds", "20"),
    ),
    "worker-machine-loss": ("--down-seconds", "15"),
    "pod0-volume-loss": (),
    "broker-pause": ("--target", "leader", "--down-seconds", "4"),
    "worker-pause": ("--down-seconds", "2"),
    "memory-pressure": ("--tasks", "240", "--rate", "10", "--fault-at", "0.25"),
}


@pytest.mark.parametrize("fault", list(BATCHES))
def test_every_fault_loses_nothing(fault: str, booted: LocalRun) -> None:
    options = [*BOOT_ARGS, "--fault-at", "0.5", "--down-seconds", "1", *BATCHES[fault]]
    booted.args = parse_args([*options, "--fault", fault, "--out", str(booted.out)])
    booted.batch()
    if fault == "worker-kill":
        # The batch ends once its tasks are done, as the replacement is Ready; the
        # killed pod's alert resolves a few seconds later (its target dropped).
        wait_until_resolved(booted, "CeleryWorkerDown", booted.record.target or "")
    report, timeline = build_report(booted.facts("ok", []))
    fired = [
        (a["alert"], a["labels"].get("pod"), a["fired_after_fault_s"], a["resolved_after_back_s"])
        for a in report["alerts"]["fired"] or []
    ]
    print(f"\nLOCAL-RUN {fault} fired (alert, pod, after the fault, resolved after back): {fired}")
    check_fault(fault, report, tasks=booted.args.tasks)
    assert timeline.marks.get("fault") is not None
    # The run's Prometheus answered throughout (what fired is each fault's own story).
    assert report["alerts"]["fired"] is not None, report["alerts"]


def test_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "localcluster", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    for option in ("--fault", "--tasks", "--task-seconds", "--workers", "--out"):
        assert option in proc.stdout
    for fault in ("broker-kill", "worker-kill", "cluster-restart", "partition"):
        assert fault in proc.stdout


def test_interrupted_mid_fault_stops_everything(tmp_path: Path) -> None:
    """SIGINT (Ctrl-C) while the gracefully stopped RabbitMQ pod is being replaced - the
    cluster is mid-change, workers are reconnecting: everything the run made still goes."""
    out = tmp_path / "out"
    err = tmp_path / "stderr.log"
    with err.open("wb") as fh:
        proc = subprocess.Popen(
            cli(out, "broker-stop"), cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=fh
        )
    try:
        deadline = time.monotonic() + 240
        while "on the same volume" not in err.read_text(errors="replace"):
            assert proc.poll() is None, err.read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, "the run never reached the restart"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:  # pragma: no cover - only if the CLI hung
            proc.kill()
            proc.wait()
    assert code == 130, err.read_text(errors="replace")[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "interrupted"
    # The graceful stop of w0's pod happened (preStop, SIGTERM: it took some time), and
    # the interrupted fault still reported it.
    assert report["fault_detail"]["target"].startswith("rabbitmq-server-")
    assert report["fault_detail"]["stop_s"] > 0
    assert report["twin"]["run_id"]
    nothing_left(report["twin"]["run_id"])
    assert report["leftovers"] == {}
    assert "stopped (preStop, SIGTERM)" in err.read_text(errors="replace")
