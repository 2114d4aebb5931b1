"""``python -m localcluster``: the whole system on this machine, one fault, the numbers.

1. boots a real 3-node RabbitMQ cluster on 127.0.0.1 (:class:`LocalRabbitCluster`);
2. starts ``--workers`` real Celery worker processes (threads pool), worker ``i``
   with its broker list rotated by ``i`` (``CELERY_BROKER_ROTATION``), so each
   starts on its own node, all writing one ledger (``TASK_LEDGER``);
3. publishes ``--tasks`` ``count`` tasks with the real scheduler
   (``python -m app.scheduler --ids-file``: the ids RabbitMQ confirmed);
4. once ``--fault-at`` of them completed, injects ``--fault``:

   * ``broker-kill``: SIGKILL the RabbitMQ node worker ``w0`` is connected to
     (read from its TCP sockets; the article drained the node running rmq-0);
   * ``broker-stop``: stop that node gracefully (SIGTERM: RabbitMQ's shutdown,
     as when Kubernetes drains its machine);
   * ``worker-kill``: SIGKILL worker ``w0`` (its whole process group) while it
     runs tasks;
   * ``worker-term``: SIGTERM worker ``w0`` while it runs tasks (Celery's warm
     shutdown: it finishes and acks them) and wait for it to exit;
   * ``cluster-restart``: stop all three nodes gracefully with tasks queued,
     start them again together (the persisted quorum-queue messages survive);
   * ``partition``: cut the node ``w0`` is connected to off from the other two
     (nftables rules on loopback, :mod:`localcluster.partition`; needs root):
     the minority node pauses (``pause_minority``), its clients fail over;
   * ``none``: nothing (the baseline);

   and ``--down-seconds`` later brings the node(s) back, or heals the
   partition, (and waits until the cluster is whole again) or starts a
   replacement worker (and waits until ready);
5. waits until every confirmed task completed (or ``--timeout``), showing
   progress on stderr every second;
6. stops every process it started, by PID (also on failure and on Ctrl-C or
   SIGTERM), then prints the report and writes ``report.json`` and
   ``timeline.png`` to ``--out`` (default ``out/local``).  The ledger, the ids
   and every worker's log are kept in ``--out``/logs.

Exit status: 0 when every confirmed task completed and nothing survived; 1 if a
task was lost; 2 on an error (the report says which); 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from app import ledger
from localcluster import twin, twin_engine
from localcluster.cli_types import fraction, non_negative_float, positive_int
from localcluster.partition import LoopbackPartition, PartitionUnavailableError, check_available
from localcluster.rabbit import ClusterError, LocalRabbitCluster, _port_open
from localcluster.report import (
    Event,
    LedgerTail,
    longest_gap,
    machine_info,
    phase_throughput,
    plot_timeline,
    read_events,
    utc_now,
)
from localcluster.sockets import connected_nodes
from localcluster.workers import WorkerProc, Workers

log = logging.getLogger("localcluster")

FAULTS = (
    "broker-kill",
    "broker-stop",
    "worker-kill",
    "worker-term",
    "cluster-restart",
    "partition",
    "none",
)
ENGINES = ("twin", "loopback")

#: How long the isolated node may take to pause once cut off (it notices at once:
#: the rules reset its distribution connections).
PAUSE_TIMEOUT = 60.0
#: A warm shutdown waits for the running tasks (10 x --task-seconds each).
WARM_SHUTDOWN_TIMEOUT = 120.0
NODES = 3
QUEUE = "localcluster"
# Sized on a 2-core / 23 GB machine: 3 workers x 10 threads run 30 tasks of
# 1 s at once; the cluster's throughput there is ~28 tasks/s (CPU-bound on the
# brokers and workers), so 2400 tasks take ~85 s of work plus ~25 s of boot.
DEFAULT_WORKERS = 3
DEFAULT_CONCURRENCY = 10
DEFAULT_TASKS = 2400
DEFAULT_STEP_SECONDS = 0.1
DEFAULT_FAULT_AT = 1 / 3
DEFAULT_DOWN_SECONDS = 5.0
DEFAULT_TIMEOUT = 600.0


class Interrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP arrived: stop everything and report."""


class LocalRun:
    """One run: start, fault, wait, stop.  :meth:`close` is safe at any point."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.logs = self.out / "logs"
        self.ledger_path = self.logs / "ledger.jsonl"
        self.ids_file = self.logs / "ids.txt"
        self.tail = LedgerTail(self.ledger_path)
        self.cluster: Any = None  # LocalRabbitCluster, or TwinNodes (the pod twin)
        self.partition: LoopbackPartition | None = None
        self.workers: Any = None  # Workers, or PodWorkers
        self.scheduler: Any = None  # SchedulerProc, or SchedulerPod
        self.scheduler_exit: int | None = None
        self.marks: dict[str, float] = {}  # wall-clock (time.time()) of each step
        self.fault: dict[str, Any] = {"kind": args.fault}
        self.seen_pids: set[int] = set()
        self.leftover_pids: list[int] = []
        self.twin_files: dict[str, str] = {}
        self.phase = "starting"
        self._stop_progress = threading.Event()
        self._progress: threading.Thread | None = None
        self._tty = sys.stderr.isatty()

    # ----------------------------------------------------------------- output
    def say(self, message: str) -> None:
        prefix = "\r\x1b[K" if self._tty else ""
        print(f"{prefix}[localcluster] {message}", file=sys.stderr, flush=True)

    def _progress_line(self) -> str:
        now = time.time()
        self.tail.poll()
        done = self.tail.completed()
        submitted = len(self.scheduler.published_ids()) if self.scheduler else 0
        nodes = sum(self.cluster.is_running(i) for i in range(NODES)) if self.cluster else 0
        workers = sum(w.alive() for w in self.workers.procs) if self.workers else 0
        elapsed = now - self.marks.get("publish", now)
        return (
            f"t={elapsed:6.1f}s done {done:>6}/{submitted:<6} of {self.args.tasks} "
            f"rate {self.tail.rate(now):6.1f}/s  nodes up {nodes}/{NODES}  "
            f"workers up {workers}  [{self.phase}]"
        )

    def _progress_loop(self) -> None:
        while not self._stop_progress.wait(1.0):
            try:
                line = self._progress_line()
                self.snapshot_pids()
            except Exception as exc:  # never let the display kill the run
                line = f"(progress unavailable: {exc!r})"
            end = "" if self._tty else "\n"
            prefix = "\r\x1b[K" if self._tty else ""
            print(f"{prefix}{line}", end=end, file=sys.stderr, flush=True)

    # -------------------------------------------------------------- processes
    def snapshot_pids(self) -> None:
        """Remember every process we have started (checked again after close)."""
        if self.cluster is not None:
            self.seen_pids.update(self.cluster.pids())
        if self.workers is not None:
            self.seen_pids.update(w.pid for w in self.workers.procs)
            self.seen_pids.update(self.workers.leftover_pids())
        if self.scheduler is not None:
            self.seen_pids.add(self.scheduler.proc.pid)

    def ours_alive(self) -> list[int]:
        """Recorded pids still alive *and* still carrying one of our markers."""
        ours: set[int] = set()
        if self.cluster is not None:
            ours |= self.cluster.live_pids()
        if self.workers is not None:
            ours |= self.workers.leftover_pids()
        return sorted(ours)

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            self.check_scheduler()
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.2)

    def check_scheduler(self) -> None:
        if self.scheduler is None or self.scheduler_exit is not None:
            return
        code = self.scheduler.proc.poll()
        if code is None:
            return
        self.scheduler_exit = code
        self.marks["published"] = time.time()
        if code != 0:
            self.say(f"scheduler exited with {code}:\n{self.scheduler.output()}")
        else:
            self.say(self.scheduler.output().strip().splitlines()[-1])

    def all_done(self) -> bool:
        self.tail.poll()
        self.check_scheduler()
        if self.scheduler is None or self.scheduler_exit is None:
            return False
        return not self.tail.missing(self.scheduler.published_ids())

    # ------------------------------------------------------------------- steps
    def execute(self) -> None:
        args = self.args
        if args.fault == "partition":
            check_available()  # before anything is started: not root, no nft
        self._clean_logs()
        self.marks["begin"] = time.time()
        self.phase = "booting RabbitMQ"
        if args.engine == "twin":
            self._boot_twin()
        else:
            self._boot_loopback()
        self.snapshot_pids()
        self.marks["workers_ready"] = time.time()

        self.phase = "running"
        self.marks["publish"] = time.time()
        self.scheduler = self.workers.scheduler(
            args.tasks, self.ids_file, step_seconds=args.task_seconds, rotation=0, rate=args.rate
        )
        self.snapshot_pids()
        self._progress = threading.Thread(target=self._progress_loop, daemon=True)
        self._progress.start()
        deadline = time.monotonic() + args.timeout

        if args.fault != "none":
            target = max(1, math.ceil(args.tasks * args.fault_at))
            self.wait_for(
                f"{target} completed tasks",
                lambda: self.all_done() or self.tail.completed() >= target,
                deadline - time.monotonic(),
            )
            self.fault["at_completed"] = self.tail.completed()
            if args.fault == "cluster-restart":
                self.cluster_restart()
            elif args.fault == "partition":
                self.partition_fault()
            else:
                kind, how = args.fault.split("-")
                if kind == "broker":
                    self.broker_fault(graceful=how == "stop")
                else:
                    self.worker_fault(graceful=how == "term")

        self.phase = "draining" if args.fault == "none" else "after the fault"
        remaining = deadline - time.monotonic()
        with contextlib.suppress(TimeoutError):
            self.wait_for("every confirmed task to complete", self.all_done, max(0.0, remaining))
        if not self.all_done():
            self.say(f"gave up waiting after --timeout {args.timeout:.0f} s")
            self.fault["timed_out"] = True
        self.marks["end"] = time.time()
        self.phase = "done"

    def _boot_loopback(self) -> None:
        args = self.args
        self.say(f"booting a {NODES}-node RabbitMQ cluster on 127.0.0.1")
        # For a partition each node opens its cluster links from its own loopback
        # address, so rules can cut one node's links (localcluster/partition.py).
        self.cluster = LocalRabbitCluster(
            size=NODES, own_dist_source_addresses=args.fault == "partition"
        )
        self.cluster.start()
        self.snapshot_pids()
        self.marks["cluster_ready"] = time.time()
        self.say(
            f"cluster {self.cluster.cluster_id} (RabbitMQ {self.cluster.version}) clustered "
            f"after {self.cluster.timings['clustered']:.1f} s; AMQP ports {self.cluster.amqp_ports}"
        )
        self.phase = "starting workers"
        self.workers = Workers(
            self.cluster.broker_urls(),
            QUEUE,
            ledger=self.ledger_path,
            workdir=self.logs,
            concurrency=args.concurrency,
            step_seconds=args.task_seconds,
        )
        started = self.workers.start_many([f"w{i}" for i in range(args.workers)])
        self.say(
            f"{len(started)} workers ready ({args.concurrency} threads each, worker wI "
            f"starts on node rmq(I mod {NODES}))"
        )

    def _boot_twin(self) -> None:
        """The prod stack's StatefulSet, worker Deployment and scheduler Job as pods."""
        args = self.args
        stack = twin_engine.STACK
        self.say(f"rendering stack {stack} and booting its RabbitMQ StatefulSet as pods")
        rendered = twin.StatefulSetTwin(
            stack,
            overrides=twin_engine.overrides(
                stack,
                workers=args.workers,
                concurrency=args.concurrency,
                tasks=args.tasks,
                task_seconds=args.task_seconds,
            ),
        )
        self.cluster = twin_engine.TwinNodes(rendered)
        self.cluster.start()
        self.snapshot_pids()
        self.marks["cluster_ready"] = time.time()
        ready = {n: round(p.wait_ready(0), 1) for n, p in rendered.pods.items()}
        self.twin_files = self.cluster.mounted_files()
        self.fault["pods_ready_s"] = ready
        self.say(
            f"run {rendered.run_id}: RabbitMQ {self.cluster.version} pods Ready after {ready} s, "
            f"clustered by Kubernetes peer discovery after "
            f"{self.cluster.timings['clustered']:.1f} s"
        )
        self.phase = "starting workers"
        self.workers = twin_engine.PodWorkers(rendered, args.task_seconds)
        # The pods write the ledger on the run's shared directory; read it live.
        self.ledger_path = self.workers.ledger
        self.ids_file = self.workers.shared / "ids.txt"
        self.tail = LedgerTail(self.ledger_path)
        started = self.workers.start_many([])
        self.say(
            f"{len(started)} worker pods Ready ({args.concurrency} threads each, "
            "broker list rotated by pod name)"
        )

    def _keep_twin_files(self) -> None:
        """The ledger and ids live in the twin's directory, which close() removes."""
        for name in ("ledger.jsonl", "ids.txt"):
            source = self.workers.shared / name
            if source.exists():
                shutil.copyfile(source, self.logs / name)
        self.ledger_path = self.logs / "ledger.jsonl"
        self.ids_file = self.logs / "ids.txt"
        for name, pod in {**self.cluster.twin.pods, **self.cluster.twin.extra_pods}.items():
            with contextlib.suppress(OSError):
                (self.logs / f"{name}.log").write_text(pod.tail(lines=400) + "\n")

    def _clean_logs(self) -> None:
        """Remove what a previous run left in --out/logs (only our own file names)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        for pattern in ("ledger.jsonl", "ids.txt", "*.log", "*.alive"):
            for path in self.logs.glob(pattern):
                path.unlink()
        for name in ("report.json", "timeline.png"):
            with contextlib.suppress(FileNotFoundError):
                (self.out / name).unlink()

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.check_scheduler()
            time.sleep(min(0.2, left))

    def broker_fault(self, graceful: bool) -> None:
        """SIGKILL (a crash) or SIGTERM (RabbitMQ's graceful shutdown, as a
        drained Kubernetes node) the RabbitMQ node worker w0 is connected to;
        ``--down-seconds`` later start it again and wait until it has rejoined."""
        assert self.cluster is not None and self.workers is not None
        victim = self.workers.procs[0]
        nodes = self.cluster.connected_nodes(victim.pid)
        if nodes:
            node, how = nodes[0], "its AMQP connection"
        else:
            node, how = 0, "its broker rotation (no connection found)"
        self.fault.update(target=self.cluster.node_names[node], node=node, found_by=how)
        self.phase = f"rmq{node} DOWN"
        self.tail.poll()
        # Tasks w0 is running: their acks can no longer reach the broker, so they
        # are redelivered (and w0's copies finish anyway: duplicates).
        self.fault["in_flight_ids"] = sorted(self.tail.in_flight(victim.nodename_prefix))
        self.marks["fault"] = time.time()
        verb = "stopped (SIGTERM, graceful)" if graceful else "SIGKILLed"
        self.say(
            f"FAULT: {verb} RabbitMQ node rmq{node} (worker {victim.name} is connected "
            f"to it, by {how}) with {self.tail.completed()} tasks completed"
        )
        self.cluster.stop_node(node, graceful=graceful)
        self.fault["stop_s"] = round(time.time() - self.marks["fault"], 2)
        self._sleep(self.args.down_seconds)
        self.phase = f"rmq{node} restarting"
        self.marks["restart"] = time.time()
        self.say(f"restarting rmq{node} (same data directory)")
        self.cluster.start_node(node)  # returns once all nodes see it running
        self.marks["rejoin"] = time.time()
        self.snapshot_pids()
        self.fault["rejoin_s"] = round(self.marks["rejoin"] - self.marks["restart"], 2)
        self.say(f"rmq{node} rejoined the cluster {self.fault['rejoin_s']:.1f} s after restart")

    def _w0_node(self) -> tuple[int, str]:
        """The node worker w0 is connected to, and how we know."""
        assert self.cluster is not None and self.workers is not None
        nodes = self.cluster.connected_nodes(self.workers.procs[0].pid)
        if nodes:
            return nodes[0], "its AMQP connection"
        return 0, "its broker rotation (no connection found)"

    def cluster_restart(self) -> None:
        """Stop all three nodes gracefully (SIGTERM, at once) with tasks queued;
        ``--down-seconds`` later start them all again, together (Mnesia: the last
        node to stop must be among the first to start), and wait until clustered."""
        assert self.cluster is not None and self.workers is not None
        self.tail.poll()
        published = len(self.scheduler.published_ids()) if self.scheduler else 0
        queued = published - self.tail.completed()
        self.fault.update(target="all nodes", queued_or_running=queued)
        # Every worker runs tasks whose acks cannot reach the broker any more.
        self.fault["in_flight_ids"] = sorted(self.tail.in_flight(""))
        self.phase = "cluster DOWN"
        self.marks["fault"] = time.time()
        self.say(
            f"FAULT: stopping all {NODES} RabbitMQ nodes (SIGTERM, graceful) with "
            f"{self.tail.completed()} tasks completed and {queued} not yet"
        )
        self.cluster.stop_nodes(graceful=True)
        self.fault["stop_s"] = round(time.time() - self.marks["fault"], 2)
        self._sleep(self.args.down_seconds)
        self.phase = "cluster restarting"
        self.marks["restart"] = time.time()
        self.say(f"starting all {NODES} nodes again (same data directories)")
        self.cluster.start_nodes()
        self.marks["rejoin"] = time.time()
        self.snapshot_pids()
        self.fault["rejoin_s"] = round(self.marks["rejoin"] - self.marks["restart"], 2)
        self.say(f"cluster whole again {self.fault['rejoin_s']:.1f} s after the restart")

    def partition_fault(self) -> None:
        """Cut the node w0 is connected to off from the other two; check that it
        pauses (pause_minority: AMQP listener closed, ``check_running`` fails, the
        majority sees it down) and that w0 fails over to another node;
        ``--down-seconds`` after the pause, heal and wait until clustered."""
        assert self.cluster is not None and self.workers is not None
        cluster = self.cluster
        victim = self.workers.procs[0]
        node, how = self._w0_node()
        peer = (node + 1) % NODES
        self.fault.update(target=cluster.node_names[node], node=node, found_by=how)
        self.tail.poll()
        self.fault["in_flight_ids"] = sorted(self.tail.in_flight(victim.nodename_prefix))
        self.partition = LoopbackPartition(cluster, node)
        self.phase = f"rmq{node} CUT OFF"
        self.marks["fault"] = time.time()
        self.say(
            f"FAULT: cutting rmq{node} (worker {victim.name} is connected to it, by {how}) "
            f"off from the other nodes with {self.tail.completed()} tasks completed"
        )
        self.partition.cut()
        port = cluster.amqp_ports[node]
        self.wait_for(f"rmq{node} to pause", lambda: not _port_open(port), PAUSE_TIMEOUT)
        self.marks["paused"] = time.time()
        self.fault["pause_s"] = round(self.marks["paused"] - self.marks["fault"], 2)
        self.phase = f"rmq{node} PAUSED"
        # Evidence of the pause, from both sides.
        try:
            cluster.rabbitmq_diagnostics(node, "check_running", timeout=30)
            self.fault["minority_check_running"] = "running"
        except ClusterError as exc:
            lines = [ln for ln in str(exc).splitlines() if "not running" in ln]
            self.fault["minority_check_running"] = lines[0] if lines else str(exc)[-200:]
        self.fault["majority_running_nodes"] = cluster.running_nodes(peer)
        self.wait_for(
            f"worker {victim.name} to connect to another node",
            lambda: bool(nodes := connected_nodes(victim.pid, cluster.amqp_ports))
            and node not in nodes,
            PAUSE_TIMEOUT,
        )
        self.fault["w0_failed_over_to"] = cluster.node_names[
            connected_nodes(victim.pid, cluster.amqp_ports)[0]
        ]
        self.say(
            f"rmq{node} paused {self.fault['pause_s']:.1f} s after the cut "
            f"({self.fault['minority_check_running']}); rmq{peer} sees "
            f"{self.fault['majority_running_nodes']}; {victim.name} now on "
            f"{self.fault['w0_failed_over_to']}"
        )
        self._sleep(self.args.down_seconds)
        self.phase = "healing"
        self.marks["restart"] = time.time()
        self.say("healing the partition")
        self.partition.heal()
        cluster.wait_clustered(timeout=120)
        self.wait_for(f"rmq{node} to accept AMQP again", lambda: _port_open(port), 60)
        self.marks["rejoin"] = time.time()
        self.fault["rejoin_s"] = round(self.marks["rejoin"] - self.marks["restart"], 2)
        self.say(f"rmq{node} back in the cluster {self.fault['rejoin_s']:.1f} s after the heal")

    def worker_fault(self, graceful: bool) -> None:
        """SIGKILL worker w0's process group mid-task (a machine dying), or
        SIGTERM it (Celery's warm shutdown, what Kubernetes sends first) and wait
        for it to exit; ``--down-seconds`` later start a replacement."""
        assert self.workers is not None
        victim = self.workers.procs[0]
        prefix = victim.nodename_prefix
        self.wait_for(
            f"worker {victim.name} to run tasks",
            lambda: bool(self.tail.in_flight(prefix)) or self.all_done(),
            60,
        )
        self.tail.poll()
        in_flight = sorted(self.tail.in_flight(prefix))
        self.fault.update(target=victim.name, pid=victim.pid)
        self.phase = f"{victim.name} DEAD" if not graceful else f"{victim.name} stopping"
        self.marks["fault"] = time.time()
        self.fault["in_flight_ids"] = in_flight
        verb = "SIGTERMed (warm shutdown)" if graceful else "SIGKILLed"
        self.say(
            f"FAULT: {verb} worker {victim.name} (pid {victim.pid}) with "
            f"{len(in_flight)} tasks in flight, {self.tail.completed()} completed"
        )
        if graceful:
            victim.terminate()  # stop consuming, finish and ack what runs, exit
            try:
                self.fault["exit_status"] = victim.wait(timeout=WARM_SHUTDOWN_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.say(f"{victim.name} still running {WARM_SHUTDOWN_TIMEOUT:.0f} s after SIGTERM")
                victim.kill()
                self.fault["exit_status"] = "killed after timeout"
            self.fault["stop_s"] = round(time.time() - self.marks["fault"], 2)
            self.phase = f"{victim.name} DEAD"
        else:
            victim.kill()  # SIGKILL the process group: no warm shutdown, no ack
            self.fault["exit_status"] = victim.proc.returncode
        self._sleep(self.args.down_seconds)
        self.phase = f"{victim.name} restarting"
        self.marks["restart"] = time.time()
        # A new name, as Kubernetes gives a replacement pod (and a fresh log).
        replacement: WorkerProc = self.workers.start(f"{victim.name}r", rotation=0)
        self.snapshot_pids()
        replacement.wait_ready(60)
        self.marks["rejoin"] = time.time()
        self.fault["replacement"] = replacement.name
        self.fault["rejoin_s"] = round(self.marks["rejoin"] - self.marks["restart"], 2)
        self.say(f"replacement worker {replacement.name} ready after {self.fault['rejoin_s']} s")

    # ----------------------------------------------------------------- cleanup
    def close(self, failed: bool) -> list[str]:
        """Stop every process we started (by PID); return the problems found."""
        problems: list[str] = []
        self._stop_progress.set()
        if self._progress is not None:
            self._progress.join(timeout=5)
            if self._tty:
                print(file=sys.stderr)
        with contextlib.suppress(Exception):
            self.snapshot_pids()
        if self.partition is not None:  # first: the rules must not outlive the run
            try:
                self.partition.heal()
            except Exception as exc:
                problems.append(f"partition: {exc}")
        if self.args.engine == "twin" and self.workers is not None:
            try:
                self._keep_twin_files()
            except Exception as exc:
                problems.append(f"keeping the ledger: {exc}")
        elif failed and self.cluster is not None:
            self._keep_rabbit_logs()
        if self.workers is not None:
            try:
                self.workers.close()
            except Exception as exc:
                problems.append(f"workers: {exc}")
        if self.cluster is not None:
            try:
                self.cluster.close()
            except (ClusterError, OSError, twin.TwinError) as exc:
                problems.append(f"rabbitmq: {exc}")
        self.leftover_pids = self.ours_alive()
        if self.leftover_pids:
            problems.append(f"processes survived: {self.leftover_pids}")
            for pid in self.leftover_pids:  # ours (marker checked): do not leave them
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return problems

    def _keep_rabbit_logs(self) -> None:
        assert self.cluster is not None
        for i in range(NODES):
            with contextlib.suppress(Exception):
                (self.logs / f"rmq{i}.log").write_text(self.cluster.logs(i, lines=200) + "\n")

    # ------------------------------------------------------------------ report
    def report(self, status: str, problems: list[str]) -> dict[str, Any]:
        args = self.args
        ids = ledger.read_ids(self.ids_file) if self.ids_file.exists() else []
        summary = ledger.read_ledger(self.ledger_path)
        counts = summary.report(ids)
        events = read_events(self.ledger_path)
        all_finishes = sorted(e.ts for e in events if e.event == ledger.FINISH)
        first_finishes = sorted(summary.first_finish[t] for t in set(ids) & summary.completed)
        begin = self.marks.get("publish", self.marks.get("begin", time.time()))
        end = all_finishes[-1] if all_finishes else self.marks.get("end", begin)
        whole_run_gap = longest_gap(all_finishes)
        fault_at = self.marks.get("fault")
        # From the fault on (the fault instant counts as a start: a pause right
        # after it is the failover's); the whole run without a fault.
        gap = (
            whole_run_gap
            if fault_at is None
            else longest_gap([fault_at, *(t for t in all_finishes if t >= fault_at)])
        )
        rejoin = self.marks.get("rejoin")
        rel = {k: round(v - begin, 2) for k, v in sorted(self.marks.items(), key=lambda kv: kv[1])}
        in_flight = self.fault.pop("in_flight_ids", None)
        if in_flight is not None:
            self.fault["in_flight"] = len(in_flight)
            self.fault["in_flight_redelivered"] = sum(summary.starts[t] >= 2 for t in in_flight)
            self.fault["in_flight_completed"] = sum(t in summary.completed for t in in_flight)
        lost_ids = sorted(summary.lost(ids))
        report: dict[str, Any] = {
            "status": status,
            "fault": args.fault,
            "submitted": len(ids),
            "completed_unique": counts["completed"],
            "lost": counts["lost"],
            "lost_ids": lost_ids[:20],
            "duplicates": counts["duplicate_ids"],
            "extra_executions": counts["extra_executions"],
            "unexpected_ids": counts["unexpected_ids"],
            "malformed_ledger_lines": counts["malformed_lines"],
            "failover_gap_s": round(gap[0], 3),
            "failover_gap_start_s": None if gap[1] is None else round(gap[1] - begin, 2),
            "longest_gap_whole_run_s": round(whole_run_gap[0], 3),
            "longest_gap_by_worker_s": {
                worker: round(longest_gap(times)[0], 3)
                for worker, times in sorted(_finishes_by_worker(events).items())
            },
            "rejoin_s": self.fault.get("rejoin_s"),
            "down_s": None if fault_at is None or rejoin is None else round(rejoin - fault_at, 2),
            "throughput_per_s": {
                k: None if v is None else round(v, 2)
                for k, v in phase_throughput(first_finishes, begin, fault_at, rejoin, end).items()
            },
            "duration_s": round(end - begin, 2),
            "fault_detail": self.fault,
            "marks_s": rel,
            "params": {
                "nodes": NODES,
                "workers": args.workers,
                "concurrency": args.concurrency,
                "tasks": args.tasks,
                "task_seconds": args.task_seconds,
                "task_duration_s": round(args.task_seconds * 10, 3),
                "fault_at": round(args.fault_at, 4),
                "down_seconds": args.down_seconds,
                "rate": args.rate,
                "timeout": args.timeout,
            },
            "timings_s": {
                "cluster_boot": _since(self.marks, "begin", "cluster_ready"),
                "workers_ready": _since(self.marks, "cluster_ready", "workers_ready"),
                "publish": _since(self.marks, "publish", "published"),
            },
            "scheduler_exit": self.scheduler_exit,
            "machine": machine_info(self.cluster.version if self.cluster else None),
            "date": utc_now(),
            "pids": sorted(self.seen_pids),
            "leftover_pids": self.leftover_pids,
            "markers": {
                "rabbit": self.cluster.cluster_id if self.cluster else None,
                "workers": self.workers.marker if self.workers else None,
            },
            "problems": problems,
            "logs": str(self.logs),
            "engine": args.engine,
        }
        if args.engine == "twin" and isinstance(self.cluster, twin_engine.TwinNodes):
            report["twin"] = {
                "stack": self.cluster.twin.stack,
                "rabbitmq_version": self.cluster.version,
                "run_id": self.cluster.twin.run_id,
                "mounted_files_sha256": self.twin_files,
                "adaptations": twin.ADAPTATIONS,
            }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        title = (
            f"{args.fault}: {counts['completed']}/{len(ids)} completed, lost {counts['lost']}, "
            f"{counts['duplicate_ids']} duplicates, "
            f"{'longest' if fault_at is None else 'failover'} gap {gap[0]:.2f} s"
        )
        plot_timeline(
            self.out / "timeline.png",
            first_finishes=first_finishes,
            all_finishes=all_finishes,
            begin=begin,
            end=max(end, rejoin or end) + 1,
            marks={k: v for k, v in self.marks.items() if k in ("fault", "restart", "rejoin")},
            gap=gap,
            title=title,
            gap_label="longest gap" if fault_at is None else "failover gap",
        )
        return report


def _finishes_by_worker(events: list[Event]) -> dict[str, list[float]]:
    by_worker: dict[str, list[float]] = {}
    for e in events:
        if e.event == ledger.FINISH:
            by_worker.setdefault(e.worker.split("@", 1)[0], []).append(e.ts)
    return by_worker


def _since(marks: dict[str, float], a: str, b: str) -> float | None:
    return round(marks[b] - marks[a], 2) if a in marks and b in marks else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m localcluster",
        description=(
            "Run the worker cluster on this machine (3 RabbitMQ nodes + Celery workers), "
            "kill something midway, and measure: lost tasks, duplicates, the longest "
            "stretch without a completion, the rejoin time and the throughput before, "
            "during and after the fault.  Writes report.json and timeline.png."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--fault",
        choices=FAULTS,
        default="broker-kill",
        help="broker-kill: SIGKILL the RabbitMQ node worker w0 is connected to; "
        "broker-stop: stop that node gracefully (SIGTERM); "
        "worker-kill: SIGKILL worker w0 mid-task; "
        "worker-term: SIGTERM worker w0 (warm shutdown) mid-task; "
        "cluster-restart: stop all three nodes gracefully and start them again; "
        "partition: cut w0's node off from the other two (needs root; it pauses); "
        "none: no fault",
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=DEFAULT_WORKERS,
        help="Celery worker processes; worker wI connects to node rmq(I mod 3) first",
    )
    parser.add_argument(
        "--concurrency", type=positive_int, default=DEFAULT_CONCURRENCY, help="threads per worker"
    )
    parser.add_argument(
        "--tasks", type=positive_int, default=DEFAULT_TASKS, help="count tasks to publish"
    )
    parser.add_argument(
        "--task-seconds",
        type=non_negative_float,
        default=DEFAULT_STEP_SECONDS,
        help="sleep per counting step, as app.scheduler: a task counts 0..9, so it runs 10x this",
    )
    parser.add_argument(
        "--fault-at",
        type=fraction,
        default=argparse.SUPPRESS,
        help="inject the fault once this fraction of --tasks has completed (default: 1/3)",
    )
    parser.add_argument(
        "--down-seconds",
        type=non_negative_float,
        default=DEFAULT_DOWN_SECONDS,
        help="how long the killed node/worker stays dead before it is brought back",
    )
    parser.add_argument(
        "--rate",
        type=non_negative_float,
        default=0.0,
        help="publish at most this many tasks per second (0: as fast as confirms allow)",
    )
    parser.add_argument(
        "--timeout",
        type=non_negative_float,
        default=DEFAULT_TIMEOUT,
        help="give up waiting for the tasks after this many seconds from publishing",
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="twin",
        help="twin: the prod stack's rendered StatefulSet, worker Deployment and scheduler "
        "Job as pods (RabbitMQ 4.3, what ships; needs root); loopback: Debian's RabbitMQ "
        "3.10 on 127.0.0.1 and worker processes (the only engine with --fault partition "
        "for now)",
    )
    parser.add_argument("--out", default="out/local", help="output directory")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the cluster's steps")
    args = parser.parse_args(argv)
    if not hasattr(args, "fault_at"):  # SUPPRESS: shown as 1/3 in --help, not 0.333...
        args.fault_at = DEFAULT_FAULT_AT
    return args


_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM/SIGHUP/SIGINT raise :class:`Interrupted` in the main thread."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """Cleanup must not be interrupted half-way (our children are in their own
    sessions: a terminal's Ctrl-C only reaches us)."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if args.engine == "twin" and args.fault == "partition":
        print(
            "[localcluster] error: --fault partition runs on --engine loopback only (the pod "
            "network partition is not built yet); nothing was started",
            file=sys.stderr,
        )
        return 2
    if args.engine == "twin" and os.geteuid() != 0:
        print(
            "[localcluster] error: --engine twin needs root (network namespaces, cgroups, "
            "mounts): run it as root, or pass --engine loopback; nothing was started",
            file=sys.stderr,
        )
        return 2
    if args.fault == "partition":
        try:
            check_available()
        except PartitionUnavailableError as exc:  # nothing started, nothing to report
            print(f"[localcluster] error: {exc}", file=sys.stderr)
            return 2
    run = LocalRun(args)
    status = "ok"
    error: BaseException | None = None
    try:
        with _signals_interrupt():
            run.execute()
    except (Interrupted, KeyboardInterrupt) as exc:
        status, error = "interrupted", exc
    except Exception as exc:
        status, error = "error", exc
    finally:
        with _signals_ignored():
            run.say("stopping every process started (by PID)")
            problems = run.close(failed=error is not None)
    if error is not None:
        if status == "error":
            traceback.print_exception(error, file=sys.stderr)
        problems.insert(0, f"{status}: {error!r}")
    try:
        report = run.report(status, problems)
    except Exception:
        traceback.print_exc(file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    run.say(
        f"{report['fault']}: submitted {report['submitted']}, completed "
        f"{report['completed_unique']}, lost {report['lost']}, duplicates "
        f"{report['duplicates']}, {'longest' if args.fault == 'none' else 'failover'} gap "
        f"{report['failover_gap_s']} s, rejoin "
        f"{report['rejoin_s']} s, throughput {report['throughput_per_s']}; "
        f"wrote {run.out / 'report.json'} and {run.out / 'timeline.png'}"
    )
    if status == "interrupted":
        return 130
    if report["lost"] > 0 or report.get("fault_detail", {}).get("timed_out"):
        return 1
    if problems or report["submitted"] != args.tasks:
        return 2
    return 0
