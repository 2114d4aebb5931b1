"""``python -m localcluster`` on the pod twin (its default engine), end to end.

The prod stack's own rendered StatefulSet (RabbitMQ 4.3.6 pods), worker
Deployment and scheduler Job as pods; the CLI runs as ``make local`` runs it, at a
small size (120 tasks of 10 x 0.2 s on 3 worker pods x 10 threads, the fault
after 40 completions, back after 1 s). After each run nothing of it is left:
no network namespace, cgroup, mount, file or process of its run id.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from localcluster import podnet, pods
from tests.integration.test_local_run import TASKS, run_local

# Measured on the twin (2 cores), after the workers stopped running mingle (it held
# a reconnected consumer ~22 s): broker-kill 2.1 s, worker-kill 1.9 s at this size.
# Bound: one task (2 s) plus 6 s for the failover on pods (reconnect, quorum-queue
# leader election, redelivery), with the node's replacement booting beside it.
GAP_BOUND_S = 8.0


def nothing_left(run_id: str) -> None:
    assert not [n for n in podnet.NETNS_DIR.glob(f"lc{run_id}-*")]
    for controller in pods.CONTROLLERS:
        assert not pods.run_cgroup(controller, run_id).exists()
    with open("/proc/mounts") as mounts:
        assert not [line for line in mounts if run_id in line]
    assert not Path(f"/var/tmp/localcluster/{run_id}").exists()


@pytest.mark.parametrize("fault", ["broker-kill", "worker-kill", "cluster-restart"])
def test_make_local_on_the_twin_loses_nothing(fault: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc, report = run_local(out, fault, engine="twin", timeout=180)
    detail = report["fault_detail"]
    print(
        f"\nTWIN-LOCAL-RUN {fault} submitted={report['submitted']} lost={report['lost']} "
        f"dup={report['duplicates']} gap={report['failover_gap_s']} "
        f"rejoin={report['rejoin_s']} down={report['down_s']} ready={detail.get('pods_ready_s')}"
    )
    twin = report["twin"]
    nothing_left(twin["run_id"])
    assert report["leftover_pids"] == []
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert report["status"] == "ok" and report["problems"] == [], report["problems"]
    assert report["engine"] == "twin"
    assert twin["stack"] == "prod" and twin["rabbitmq_version"].startswith("4.3.")
    assert "/etc/rabbitmq/rabbitmq.conf" in twin["mounted_files_sha256"]
    assert set(twin["adaptations"]) >= {"image", "PersistentVolumeClaim", "Service DNS"}
    assert report["submitted"] == TASKS
    assert report["lost"] == 0, report["lost_ids"]
    assert report["completed_unique"] == TASKS
    assert detail["in_flight_completed"] == detail["in_flight"]
    if fault == "cluster-restart":
        # Tasks were still queued when the whole cluster stopped: they survived it.
        assert detail["queued_or_running"] > 0, detail
        # The gap is the outage itself plus the workers' way back: kombu's reconnect
        # back-off (up to 10 s between rounds), redelivery and one 2 s task
        # (measured: gap 12.2 s, down 31.1 s).
        assert report["failover_gap_s"] < report["down_s"] + 14, report
    else:
        assert report["failover_gap_s"] < GAP_BOUND_S, report
    if fault == "broker-kill":
        assert detail["found_by"] == "its AMQP connection", detail
        assert detail["target"].startswith("rabbitmq-server-")
    if fault == "worker-kill":
        # SIGKILLed mid-task: what it was running ran again elsewhere.
        assert detail["in_flight"] > 0, detail
        assert detail["in_flight_redelivered"] == detail["in_flight"]
        assert report["duplicates"] >= detail["in_flight"]
    assert (out / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "logs" / "ledger.jsonl").exists()
