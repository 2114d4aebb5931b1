"""No task is lost: real Celery workers against a real 3-node RabbitMQ cluster.

Each test publishes with the real scheduler (``python -m app.scheduler
--ids-file``: the ids RabbitMQ confirmed), runs real worker processes
(``celery -A app.celery worker --pool threads``) and reads the ledger the
``count`` task appends to.  Every published id is checked: lost must be 0.
Duplicates (at-least-once delivery) are reported, not forbidden, except where
the test is about them.

The ``rabbit_cluster`` fixture (tests/integration/conftest.py) is shared, so
every test uses its own queue.  Each test's numbers are printed (``-rP``/``-s``).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from app import ledger
from localcluster.workers import CELERY_BIN, REPO_ROOT, Workers

pytestmark = pytest.mark.rabbitmq

RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
INSTALL_COMMAND = "apt-get install -y rabbitmq-server"


@pytest.fixture(scope="session", autouse=True)
def _require_rabbitmq() -> None:
    """Never skip: without RabbitMQ these tests fail and say how to install it."""
    if not RABBITMQ_SERVER.exists():
        pytest.fail(
            f"RabbitMQ is not installed ({RABBITMQ_SERVER} missing). Install it as root with:\n"
            f"    {INSTALL_COMMAND}",
            pytrace=False,
        )
    if not CELERY_BIN.exists():
        pytest.fail(f"{CELERY_BIN} missing: install the dev requirements", pytrace=False)


def unique_queue(label: str) -> str:
    return f"test-{label}-{uuid.uuid4().hex[:8]}"


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until predicate() is true; return the seconds it took."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - t0


def started_by(path: Path, worker_prefix: str) -> tuple[set[str], set[str]]:
    """(task ids started by a worker, task ids finished by it) from the raw ledger."""
    starts: set[str] = set()
    finishes: set[str] = set()
    if not path.exists():
        return starts, finishes
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not str(rec.get("worker", "")).startswith(worker_prefix):
            continue
        (starts if rec["event"] == ledger.START else finishes).add(rec["task_id"])
    return starts, finishes


def _starts(path: Path) -> list[tuple[float, str]]:
    """(timestamp, worker) of every start in the ledger."""
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == ledger.START:
            out.append((float(rec["ts"]), str(rec.get("worker", ""))))
    return out


def report(name: str, ids: list[str], led: Path, seconds: float, **extra: Any) -> dict[str, Any]:
    summary = ledger.read_ledger(led)
    numbers: dict[str, Any] = {"test": name, **summary.report(ids), "seconds": round(seconds, 2)}
    numbers.update(extra)
    print("\nNO-LOSS " + json.dumps(numbers, sort_keys=True))
    return numbers


def all_completed(led: Path, ids_file: Path) -> Callable[[], bool]:
    def check() -> bool:
        ids = ledger.read_ids(ids_file) if ids_file.exists() else []
        return bool(ids) and not ledger.read_ledger(led).lost(ids)

    return check


# ------------------------------------------------------------------------------------
# 1. Plain run: N tasks, 3 workers (one per node), all complete.
# ------------------------------------------------------------------------------------
def test_all_tasks_complete_with_three_workers(
    rabbit_cluster: Any, workers_factory: Callable[..., Workers], tmp_path: Path
) -> None:
    n = 200
    w = workers_factory(
        unique_queue("all"),
        broker_urls=rabbit_cluster.broker_urls(),
        concurrency=10,
        step_seconds=0.001,
    )
    t0 = time.monotonic()
    w.start_many(["a", "b", "c"])  # rotations 0, 1, 2: one worker per node
    ids_file = tmp_path / "ids.txt"
    out = w.publish(n, ids_file)
    assert f"published={n} failed=0" in out, out
    ids = ledger.read_ids(ids_file)
    assert len(ids) == n
    wait_until(all_completed(w.ledger, ids_file), 60, f"{n} tasks to complete")
    summary = ledger.read_ledger(w.ledger)
    per_worker = {
        p.name: len(started_by(w.ledger, p.nodename_prefix)[1] & set(ids)) for p in w.procs
    }
    numbers = report("three_workers", ids, w.ledger, time.monotonic() - t0, per_worker=per_worker)
    assert numbers["lost"] == 0
    assert numbers["completed"] == n
    assert summary.malformed_lines == 0
    assert sum(1 for c in per_worker.values() if c) >= 2, f"load not spread: {per_worker}"
    # The Kubernetes liveness probe's command passes for every running worker.
    for p in w.procs:
        probe = subprocess.run(
            [
                sys.executable,
                "-m",
                "app.liveness",
                "--max-age",
                "30",
                "--file",
                str(p.liveness_file),
            ],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        assert probe.returncode == 0, probe.stderr


# ------------------------------------------------------------------------------------
# 2. SIGKILL a worker mid-task: its running tasks are redelivered and completed.
# ------------------------------------------------------------------------------------
def test_sigkilled_worker_tasks_are_redelivered(
    rabbit_cluster: Any, workers_factory: Callable[..., Workers], tmp_path: Path
) -> None:
    n = 12
    w = workers_factory(
        unique_queue("kill"),
        broker_urls=rabbit_cluster.broker_urls(),
        concurrency=3,
        step_seconds=0.2,  # 2 s per task: killed mid-task for sure
    )
    t0 = time.monotonic()
    victim, survivor = w.start_many(["victim", "survivor"])
    ids_file = tmp_path / "ids.txt"
    w.publish(n, ids_file)
    ids = ledger.read_ids(ids_file)
    assert len(ids) == n

    def victim_is_busy() -> bool:
        starts, finishes = started_by(w.ledger, victim.nodename_prefix)
        return len(starts - finishes) >= 2

    wait_until(victim_is_busy, 30, "the victim to be running tasks")
    victim.kill()  # SIGKILL the whole process group: no warm shutdown, no ack
    assert not victim.alive()
    starts, finishes = started_by(w.ledger, victim.nodename_prefix)
    in_flight = starts - finishes  # running when the victim died
    assert in_flight

    wait_until(all_completed(w.ledger, ids_file), 60, "every task to complete")
    summary = ledger.read_ledger(w.ledger)
    for tid in in_flight:
        assert summary.starts[tid] >= 2, f"{tid} was not redelivered: {summary.workers[tid]}"
        assert tid in summary.completed
        assert any(x.startswith(survivor.nodename_prefix) for x in summary.workers[tid])
    numbers = report(
        "sigkill_worker",
        ids,
        w.ledger,
        time.monotonic() - t0,
        killed_in_flight=len(in_flight),
        victim_exit=victim.proc.returncode,
    )
    assert numbers["lost"] == 0
    assert numbers["completed"] == n
    assert set(summary.duplicates) >= in_flight


# ------------------------------------------------------------------------------------
# 3. SIGTERM: warm shutdown lets in-flight tasks finish, exit 0 within the grace period.
# ------------------------------------------------------------------------------------
GRACE_SECONDS = 20.0


def test_sigterm_warm_shutdown_finishes_in_flight_tasks(
    rabbit_cluster: Any, workers_factory: Callable[..., Workers], tmp_path: Path
) -> None:
    n, concurrency, step = 10, 4, 0.3  # 3 s per task
    w = workers_factory(
        unique_queue("term"),
        broker_urls=rabbit_cluster.broker_urls(),
        concurrency=concurrency,
        step_seconds=step,
    )
    t0 = time.monotonic()
    (leaving,) = w.start_many(["leaving"])
    ids_file = tmp_path / "ids.txt"
    w.publish(n, ids_file)
    ids = ledger.read_ids(ids_file)

    def leaving_is_full() -> bool:
        return len(started_by(w.ledger, leaving.nodename_prefix)[0]) >= concurrency

    wait_until(leaving_is_full, 30, "the worker to run a full batch")
    t_term = time.monotonic()
    leaving.terminate()
    code = leaving.wait(timeout=GRACE_SECONDS)
    shutdown_seconds = time.monotonic() - t_term
    assert code == 0, f"warm shutdown exit status {code}:\n{leaving.log()}"
    assert shutdown_seconds < GRACE_SECONDS

    starts, finishes = started_by(w.ledger, leaving.nodename_prefix)
    assert starts, "the worker ran nothing"
    assert starts == finishes, f"unfinished at exit: {starts - finishes}"
    # prefetch = multiplier 1 x concurrency: it held nothing it could not run.
    assert len(starts) == concurrency
    # ...and it acked them: nothing it finished is delivered again.
    (joining,) = [w.start("joining", rotation=1)]
    joining.wait_ready(60)
    wait_until(all_completed(w.ledger, ids_file), 60, "the rest of the tasks")
    summary = ledger.read_ledger(w.ledger)
    numbers = report(
        "sigterm_warm_shutdown",
        ids,
        w.ledger,
        time.monotonic() - t0,
        in_flight_at_sigterm=len(starts),
        shutdown_seconds=round(shutdown_seconds, 2),
        exit_status=code,
    )
    assert numbers["lost"] == 0
    assert numbers["completed"] == n
    assert not (set(summary.duplicates) & starts), "a warm-shut-down task ran again"


# ------------------------------------------------------------------------------------
# 3b. prefork: a pool child killed mid-task (OOM killer) -> requeued, not failed.
# ------------------------------------------------------------------------------------
def test_prefork_child_killed_task_is_requeued(
    rabbit_cluster: Any, workers_factory: Callable[..., Workers], tmp_path: Path
) -> None:
    """task_reject_on_worker_lost: without it the task would be acked as failed."""
    n = 6
    w = workers_factory(
        unique_queue("prefork"),
        broker_urls=rabbit_cluster.broker_urls(),
        concurrency=2,
        step_seconds=0.2,
        pool="prefork",
    )
    t0 = time.monotonic()
    (worker,) = w.start_many(["forky"])
    ids_file = tmp_path / "ids.txt"
    w.publish(n, ids_file)
    ids = ledger.read_ids(ids_file)

    def running_in_child() -> tuple[str, int] | None:
        finished = set()
        running: dict[str, int] = {}
        for line in w.ledger.read_text().splitlines() if w.ledger.exists() else []:
            rec = json.loads(line)
            if rec["event"] == ledger.FINISH:
                finished.add(rec["task_id"])
            elif rec["pid"] != worker.pid:
                running[rec["task_id"]] = rec["pid"]
        for tid, pid in running.items():
            if tid not in finished:
                return tid, pid
        return None

    wait_until(lambda: running_in_child() is not None, 30, "a task running in a pool child")
    victim = running_in_child()
    assert victim is not None
    victim_task, child_pid = victim
    os.kill(child_pid, signal.SIGKILL)  # only the child: the worker itself lives on
    wait_until(all_completed(w.ledger, ids_file), 60, "every task to complete")
    summary = ledger.read_ledger(w.ledger)
    assert worker.alive(), "the worker died with its pool child"
    assert summary.starts[victim_task] >= 2, "the killed child's task was not redelivered"
    assert victim_task in summary.completed
    numbers = report(
        "prefork_child_sigkill",
        ids,
        w.ledger,
        time.monotonic() - t0,
        killed_child_pid=child_pid,
    )
    assert numbers["lost"] == 0
    assert numbers["completed"] == n


# ------------------------------------------------------------------------------------
# 4. Publishing while a broker node is killed and restarted loses nothing.
# ------------------------------------------------------------------------------------
def test_publish_through_broker_node_restart(
    rabbit_cluster: Any, workers_factory: Callable[..., Workers], tmp_path: Path
) -> None:
    # A 30 s publishing window around the kill and restart: a restart took 12.8-15.7 s
    # on a busy 2-core machine, and the node must be back before the last publish.
    n, rate = 1500, 50.0
    node = 0
    w = workers_factory(
        unique_queue("node"),
        broker_urls=rabbit_cluster.broker_urls(),
        concurrency=20,
        # 0.5 s tasks: the worker on the killed node has tasks in flight, which
        # cannot be acked any more and are redelivered (duplicates, not losses).
        step_seconds=0.05,
    )
    t0 = time.monotonic()
    # Worker "on0" declares the queue through node 0 first (leader there), then
    # "on1" joins through node 1.  The scheduler publishes through node 0.
    on0 = w.start("on0", rotation=0)
    on0.wait_ready(60)
    on1 = w.start("on1", rotation=1)
    on1.wait_ready(60)
    ids_file = tmp_path / "ids.txt"
    sched = w.scheduler(n, ids_file, rotation=node, rate=rate)
    restart_seconds = 0.0
    try:
        wait_until(lambda: len(sched.published_ids()) >= 100, 30, "publishing to start")
        at_kill = len(sched.published_ids())
        t_kill = time.time()
        rabbit_cluster.kill_node(node)  # SIGKILL: the node the scheduler talks to
        time.sleep(2)
        t_restart = time.monotonic()
        rabbit_cluster.start_node(node)  # waits until it has rejoined the cluster
        restart_seconds = time.monotonic() - t_restart
        at_rejoin = len(sched.published_ids())
        code = sched.proc.wait(timeout=120)
    finally:
        if not rabbit_cluster.is_running(node):  # leave the shared cluster whole
            rabbit_cluster.start_node(node)
    output = sched.output()
    assert code == 0, output
    assert f"published={n} failed=0" in output, output
    assert at_kill < n and at_rejoin < n, "the node was not restarted mid-publish"
    ids = ledger.read_ids(ids_file)
    assert len(ids) == n
    wait_until(all_completed(w.ledger, ids_file), 90, "every task to complete")
    assert on0.alive() and on1.alive(), "a worker died with the broker node"
    # The worker whose node died failed over and went back to work at once:
    # the longest pause between two of its task starts around the kill (Celery's
    # stock delayed-delivery step kept it idle ~9 s retrying the dead node:
    # app/bootsteps.py).
    on0_starts = sorted(
        ts
        for ts, worker in _starts(w.ledger)
        if worker.startswith(on0.nodename_prefix) and t_kill - 1 <= ts <= t_kill + 15
    )
    on0_idle = max(b - a for a, b in itertools.pairwise(on0_starts))
    numbers = report(
        "publish_through_node_restart",
        ids,
        w.ledger,
        time.monotonic() - t0,
        published_before_kill=at_kill,
        published_before_rejoin=at_rejoin,
        node_restart_seconds=round(restart_seconds, 2),
        failed_over_worker_max_idle_seconds=round(on0_idle, 2),
        scheduler=output.strip().splitlines()[-1],
    )
    assert numbers["lost"] == 0
    assert numbers["completed"] == n
    assert on0_idle < 5.0, "the failed-over worker stayed idle"
