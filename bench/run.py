"""``python -m bench`` (``make bench``): the article's configuration against ours, side by side.

One real 3-node RabbitMQ 3.10.8 cluster on 127.0.0.1 (:class:`LocalRabbitCluster`,
configured by ``components.rabbitmq_conf`` as shipped), two configurations, each in
its own vhost so they never share a queue or a policy:

* ``article``: vhost ``article`` with the article's policy, set with ``rabbitmqctl
  set_policy -p article ha-all ".*" '{"ha-mode":"all","ha-sync-mode":"automatic"}'``
  (classic queues mirrored to every node), and ``bench.article_app``: Celery's
  defaults but the broker URL list (early ack, prefetch x4, no publisher confirms,
  classic ``celery`` queue on a direct exchange, URL list not rotated), prefork pool
  with Celery's default concurrency (one process per CPU);
* ``ours``: the definitions' vhost (its quorum-queue delivery-limit policy) and
  ``app.celery``, i.e. exactly ``celery_config(WorkerSettings.from_env(...))``
  with the shipped defaults (quorum queue, late ack, prefetch 1, confirms, threads
  pool and its default concurrency, URL list rotated per worker).

Each run, for each configuration (runs interleave the two, so a load spike on a
shared machine hits both): one set of 3 workers, and in order

1. ``publish``: one producer publishes ``--publish-tasks`` no-op tasks while no
   worker consumes (the 3 workers are up, told to cancel their consumer through
   Celery's remote control): publish rate (tasks/s, the producer's loop); then as
   many again with publisher confirms switched (on for the article, off for
   ours), the only change, to show what confirms cost;
2. ``drain``: the 3 workers are told to consume again, all at once: drain rate
   (tasks / seconds from that moment to the last completion) over both batches;
3. ``sleep``: the article's workload shape: ``--sleep-tasks`` tasks sleeping
   ``--sleep-seconds`` each, published to the idle workers: time from the first
   publish to the last completion, against ``tasks x seconds / slots``;
4. ``failover``: ``--failover-tasks`` short tasks published at ``--failover-rate``;
   once ``--fault-at`` of them completed, SIGKILL of the RabbitMQ node worker
   ``w0`` is connected to, restarted ``--down-seconds`` later: tasks lost
   (published ids that never completed), duplicate executions, failover gap
   (longest stretch without a completion).

Every process started (RabbitMQ nodes, epmd, workers, publishers) is stopped by
PID on success, failure, Ctrl-C or SIGTERM.  Writes ``results.json`` and
``bench.png`` to ``--out`` and prints the table.  Exit status: 0 when every
phase ran (tasks lost by the article's configuration are a result, not an
error), 2 on an error, 130 when interrupted.
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
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import quote

from celery import Celery
from kombu import Connection

from app import ledger
from app.settings import ENV_BROKER_ROTATION, ENV_BROKER_URLS, ENV_HOSTNAME, WorkerSettings
from bench.results import CONFIG_KEYS, build_results, format_table, plot_results
from localcluster.cli_types import fraction, non_negative_float, positive_float, positive_int
from localcluster.rabbit import ClusterError, LocalRabbitCluster, marked_pids
from localcluster.report import LedgerTail, longest_gap, read_events
from localcluster.sockets import connected_nodes
from localcluster.workers import REPO_ROOT, Workers

log = logging.getLogger("bench")

NODES = 3
WORKERS = 3
ARTICLE_VHOST = "article"
HA_ALL_POLICY = '{"ha-mode":"all","ha-sync-mode":"automatic"}'
COUNT_STEPS = 10  # app.tasks.count sleeps 10 x step_seconds


class Interrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP: stop everything, write what was measured."""


@dataclass(frozen=True)
class Config:
    """One side of the comparison."""

    key: str
    title: str
    app: str  # Celery app module the workers and the publisher load
    vhost: str
    queue: str
    pool: str
    concurrency: int
    heartbeat: int
    settings: dict[str, Any]  # what differs, for results.json


def article_config() -> Config:
    """The article: Celery's defaults (read from Celery, not restated)."""
    from celery.app.defaults import DEFAULTS

    concurrency = DEFAULTS["worker_concurrency"] or os.cpu_count() or 1
    return Config(
        key="article",
        title="article (ha-all mirrored classic queue, Celery defaults)",
        app="bench.article_app",
        vhost=ARTICLE_VHOST,
        queue=DEFAULTS["task_default_queue"],
        pool=DEFAULTS["worker_pool"],
        concurrency=concurrency,
        heartbeat=DEFAULTS["broker_heartbeat"],
        settings={
            "celery_app": "bench.article_app (Celery('tasks', broker=URL list))",
            "policy": f"ha-all '.*' {HA_ALL_POLICY}",
            "queue_type": DEFAULTS["task_default_queue_type"],
            "exchange_type": DEFAULTS["task_default_exchange_type"],
            "task_acks_late": DEFAULTS["task_acks_late"],
            "worker_prefetch_multiplier": DEFAULTS["worker_prefetch_multiplier"],
            "confirm_publish": False,
            "task_publish_retry_policy": DEFAULTS["task_publish_retry_policy"],
            "publish_retry_seconds": None,  # Celery's default policy only
            "broker_url_order": "as listed (rmq0 first for every process)",
            "broker_heartbeat": DEFAULTS["broker_heartbeat"],
            "pool": DEFAULTS["worker_pool"],
            "concurrency": concurrency,
            "concurrency_note": f"Celery's default: the CPU count here ({os.cpu_count()})",
        },
    )


def ours_config(cluster_vhost: str, urls: list[str]) -> Config:
    """This project: exactly what app.celery loads from the shipped defaults."""
    from app.settings import celery_config

    shipped = WorkerSettings.from_env({ENV_BROKER_URLS: ",".join(urls), ENV_HOSTNAME: "w0"})
    conf = celery_config(shipped)
    return Config(
        key="ours",
        title="ours (quorum queue, app/settings.py)",
        app="app.celery",
        vhost=cluster_vhost,
        queue=shipped.queue,
        pool=shipped.pool,
        concurrency=shipped.concurrency,
        heartbeat=shipped.heartbeat,
        settings={
            "celery_app": "app.celery (celery_config(WorkerSettings.from_env()))",
            "policy": "quorum-delivery-limit (components/rabbitmq_conf.py definitions)",
            "queue_type": conf["task_default_queue_type"],
            "exchange_type": conf["task_default_exchange_type"],
            "task_acks_late": conf["task_acks_late"],
            "worker_prefetch_multiplier": conf["worker_prefetch_multiplier"],
            "confirm_publish": conf["broker_transport_options"].get("confirm_publish", False),
            "task_publish_retry_policy": conf["task_publish_retry_policy"],
            "publish_retry_seconds": shipped.publish_retry_seconds,
            "broker_url_order": f"rotated per worker ({ENV_BROKER_ROTATION} = worker index)",
            "broker_heartbeat": conf["broker_heartbeat"],
            "pool": conf["worker_pool"],
            "concurrency": conf["worker_concurrency"],
            "concurrency_note": "app.settings default for the threads pool",
        },
    )


@dataclass
class Publisher:
    """A ``python -m bench.publish`` process and its files."""

    name: str
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def ids_file(self) -> Path:
        return self.workdir / f"{self.name}.ids"

    @property
    def result_file(self) -> Path:
        return self.workdir / f"{self.name}.json"

    @property
    def log_file(self) -> Path:
        return self.workdir / f"{self.name}-publisher.log"

    def ids(self) -> list[str]:
        """Ids published so far (all of them once the process exited)."""
        return ledger.read_ids(self.ids_file) if self.ids_file.exists() else []


def vhost_urls(urls: list[str], vhost: str) -> list[str]:
    """The cluster's URLs with another vhost."""
    return [u.rsplit("/", 1)[0] + "/" + quote(vhost, safe="") for u in urls]


# --------------------------------------------------------------------- the bench
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.logs = self.out / "logs"
        self.cluster: LocalRabbitCluster | None = None
        self.workers: Workers | None = None
        self.publishers: list[subprocess.Popen[bytes]] = []
        self.configs: dict[str, Config] = {}
        self.urls: dict[str, list[str]] = {}
        self.runs: dict[str, list[dict[str, Any]]] = {k: [] for k in CONFIG_KEYS}
        self.checks: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self.seen_pids: set[int] = set()
        self.status_line: Callable[[], str] | None = None
        self._stop = threading.Event()
        self._progress: threading.Thread | None = None
        self._tty = sys.stderr.isatty()

    # ------------------------------------------------------------------ output
    def say(self, message: str) -> None:
        prefix = "\r\x1b[K" if self._tty else ""
        print(f"{prefix}[bench] {message}", file=sys.stderr, flush=True)

    def _progress_loop(self) -> None:
        every = 1.0 if self._tty else 5.0
        while not self._stop.wait(every):
            line = self.status_line
            if line is None:
                continue
            try:
                text = line()
                self.snapshot_pids()
            except Exception as exc:  # the display must never kill the run
                text = f"(progress unavailable: {exc!r})"
            if self._tty:
                print(f"\r\x1b[K        {text}", end="", file=sys.stderr, flush=True)
            else:
                print(f"        {text}", file=sys.stderr, flush=True)

    def snapshot_pids(self) -> None:
        if self.cluster is not None:
            self.seen_pids.update(self.cluster.pids())
        if self.workers is not None:
            self.seen_pids.update(w.pid for w in self.workers.procs)
        self.seen_pids.update(p.pid for p in self.publishers)

    # ------------------------------------------------------------------- setup
    def setup(self) -> None:
        if self.logs.exists():
            shutil.rmtree(self.logs)
        self.logs.mkdir(parents=True)
        for name in ("results.json", "bench.png"):
            with contextlib.suppress(FileNotFoundError):
                (self.out / name).unlink()
        self._progress = threading.Thread(target=self._progress_loop, daemon=True)
        self._progress.start()
        self.say(f"booting a {NODES}-node RabbitMQ cluster on 127.0.0.1")
        t0 = time.monotonic()
        self.cluster = LocalRabbitCluster(size=NODES)
        self.cluster.start()
        self.snapshot_pids()
        self.timings["cluster_boot_s"] = round(time.monotonic() - t0, 2)
        self.say(f"RabbitMQ {self.cluster.version} clustered in {self.timings['cluster_boot_s']} s")
        # The article's vhost, its user permissions and ha-all policy: cheaper than
        # a second cluster (a few rabbitmqctl calls vs. a ~20 s boot, both recorded).
        t0 = time.monotonic()
        c = self.cluster
        c.rabbitmqctl(0, "add_vhost", ARTICLE_VHOST)
        c.rabbitmqctl(0, "set_permissions", "-p", ARTICLE_VHOST, c.username, ".*", ".*", ".*")
        c.rabbitmqctl(0, "set_policy", "-p", ARTICLE_VHOST, "ha-all", ".*", HA_ALL_POLICY)
        self.timings["article_vhost_setup_s"] = round(time.monotonic() - t0, 2)
        took = self.timings["article_vhost_setup_s"]
        self.say(f"vhost '{ARTICLE_VHOST}' with the ha-all policy in {took} s")
        ours_urls = c.broker_urls()
        self.configs = {"article": article_config(), "ours": ours_config(c.vhost, ours_urls)}
        self.urls = {
            "article": vhost_urls(ours_urls, ARTICLE_VHOST),
            "ours": ours_urls,
        }

    # -------------------------------------------------------------------- runs
    def execute(self) -> None:
        self.setup()
        total = self.args.runs
        for run in range(1, total + 1):
            for key in CONFIG_KEYS:
                self.runs[key].append(self.one_run(self.configs[key], run, total))

    def one_run(self, cfg: Config, run: int, total: int) -> dict[str, Any]:
        args = self.args
        assert self.cluster is not None
        where = f"run {run}/{total} {cfg.key}"
        workdir = self.logs / f"run{run}-{cfg.key}"
        result: dict[str, Any] = {"run": run}
        self.workers = Workers(
            self.urls[cfg.key],
            cfg.queue,
            ledger=workdir / "ledger.jsonl",
            workdir=workdir,
            concurrency=cfg.concurrency,
            pool=cfg.pool,
            heartbeat=cfg.heartbeat,
            app=cfg.app,
        )
        tail = LedgerTail(workdir / "ledger.jsonl")
        try:
            self.delete_queue(cfg)
            # The workers first, told to stop consuming: publishing meets no consumer,
            # and the drain starts on all three at once (a worker that boots later
            # than the others would otherwise drain alone for a while).
            self.say(f"{where}: start {WORKERS} workers ({cfg.pool} x {cfg.concurrency})")
            t0 = time.monotonic()
            self.workers.start_many([f"w{i}" for i in range(WORKERS)], timeout=120)
            self.snapshot_pids()
            result["workers_ready_s"] = round(time.monotonic() - t0, 2)
            self.set_consuming(cfg, False)

            # 1. publish, nobody consuming
            self.say(f"{where}: publish {args.publish_tasks} no-op tasks, no worker consuming")
            pub = self.publish(cfg, "publish", args.publish_tasks, 0.0, 0.0, workdir, where)
            ids = set(pub["ids"])
            result["publish"] = {k: v for k, v in pub.items() if k != "ids"}
            result["publish_rate"] = pub["rate"]
            result["publish"]["queue_depth"] = self.queue_depth(cfg, len(ids))
            if run == 1:
                self.checks[cfg.key] = self.check_queue(cfg)
            # The same with publisher confirms switched (and nothing else): what
            # they cost, apart from the queue type.
            toggled = "on" if not cfg.settings["confirm_publish"] else "off"
            self.say(
                f"{where}: publish {args.publish_tasks} more with publisher confirms {toggled}"
            )
            pub2 = self.publish(
                cfg, "publish-toggled", args.publish_tasks, 0.0, 0.0, workdir, where, toggled
            )
            result["publish_toggled"] = {k: v for k, v in pub2.items() if k != "ids"}
            result["publish_rate_confirms_toggled"] = pub2["rate"]
            ids |= set(pub2["ids"])
            result["publish_toggled"]["queue_depth"] = self.queue_depth(cfg, len(ids))

            # 2. drain: the 3 workers on the full queue
            self.say(f"{where}: drain: {WORKERS} workers consume again")
            self.status_line = lambda: self._line(where, "drain", tail, ids)
            drain_from = time.time()
            self.set_consuming(cfg, True)
            self.wait_all(tail, ids, args.timeout, f"{where} drain")
            events = read_events(tail.path)
            last = max(e.ts for e in events if e.event == ledger.FINISH and e.task_id in ids)
            result["drain_rate"] = len(ids) / (last - drain_from)
            result["drain"] = {"tasks": len(ids), "drain_s": last - drain_from}

            # 3. the article's workload shape, on the idle workers
            slots = WORKERS * cfg.concurrency
            ideal = args.sleep_tasks * args.sleep_seconds / slots
            self.say(
                f"{where}: {args.sleep_tasks} tasks x {args.sleep_seconds} s on {slots} slots "
                f"(ideal {ideal:.2f} s)"
            )
            step = args.sleep_seconds / COUNT_STEPS
            sleep_pub = self.start_publisher(cfg, "sleep", args.sleep_tasks, step, 0.0, workdir)
            self.status_line = lambda: self._line(where, "sleep", tail, set(sleep_pub.ids()))
            sleep_done = self.finish_publish(sleep_pub, where)
            sleep_ids = set(sleep_done["ids"])
            self.wait_all(tail, sleep_ids, args.timeout + ideal, f"{where} sleep")
            events = read_events(tail.path)
            finishes = [e.ts for e in events if e.event == ledger.FINISH and e.task_id in sleep_ids]
            starts = [e.ts for e in events if e.event == ledger.START and e.task_id in sleep_ids]
            drain_s = max(finishes) - sleep_done["started"]
            result["sleep_drain_s"] = drain_s
            result["sleep_ideal_s"] = ideal
            result["sleep"] = {
                "tasks": len(sleep_ids),
                "task_seconds": args.sleep_seconds,
                "slots": slots,
                "pool": cfg.pool,
                "concurrency_per_worker": cfg.concurrency,
                "ideal_s": ideal,
                "drain_s": drain_s,
                "first_start_to_last_finish_s": max(finishes) - min(starts),
                "publish_s": sleep_done["elapsed_s"],
                "efficiency": ideal / drain_s if drain_s > 0 else None,
            }

            # 4. failover
            result["failover"] = self.failover(cfg, workdir, tail, where)
            for key in ("lost", "duplicates", "gap_s"):
                result[f"failover_{key}"] = result["failover"][key]
        finally:
            self.status_line = None
            self.snapshot_pids()
            workers, self.workers = self.workers, None
            self.stop_publishers()
            workers.close()
        self.delete_queue(cfg)
        self.say(
            f"{where}: publish {_f(result['publish_rate'])}/s, drain {_f(result['drain_rate'])}/s, "
            f"sleep {_f(result['sleep_drain_s'])} s (ideal {_f(result['sleep_ideal_s'])}), "
            f"failover lost {result['failover_lost']}, ran twice {result['failover_duplicates']}, "
            f"gap {_f(result['failover_gap_s'])} s"
        )
        return result

    def failover(self, cfg: Config, workdir: Path, tail: LedgerTail, where: str) -> dict[str, Any]:
        args = self.args
        assert self.cluster is not None and self.workers is not None
        n = args.failover_tasks
        self.say(
            f"{where}: failover: {n} tasks of {args.failover_task_seconds} s at "
            f"{args.failover_rate}/s; SIGKILL w0's node after {math.ceil(n * args.fault_at)} "
            "completions"
        )
        pub = self.start_publisher(
            cfg,
            "failover",
            n,
            args.failover_task_seconds / COUNT_STEPS,
            args.failover_rate,
            workdir,
        )
        phase = {"text": "running"}
        self.status_line = lambda: self._line(
            where, f"failover {phase['text']}", tail, set(pub.ids())
        )

        def completed() -> int:
            tail.poll()
            ids = pub.ids()
            return len(ids) - len(tail.missing(ids))

        target = max(1, math.ceil(n * args.fault_at))
        deadline = time.monotonic() + args.timeout
        while completed() < target:
            if pub.proc is not None and pub.proc.poll() is not None:
                break  # published everything already; kill anyway
            if time.monotonic() > deadline:
                raise TimeoutError(f"{where}: fewer than {target} completions in time")
            time.sleep(0.05)
        victim = self.workers.procs[0]
        nodes = connected_nodes(victim.pid, self.cluster.amqp_ports)
        node = nodes[0] if nodes else 0
        detail: dict[str, Any] = {
            "tasks": n,
            "rate": args.failover_rate,
            "task_seconds": args.failover_task_seconds,
            "killed_node": self.cluster.node_names[node],
            "found_by": "w0's AMQP connection" if nodes else "default (no connection found)",
            "completed_at_kill": completed(),
        }
        phase["text"] = f"rmq{node} DOWN"
        kill_at = time.time()
        self.cluster.kill_node(node)
        self.say(f"{where}: SIGKILLed rmq{node} (w0 is connected to it)")
        time.sleep(args.down_seconds)
        phase["text"] = f"rmq{node} restarting"
        t0 = time.monotonic()
        self.cluster.start_node(node)
        self.snapshot_pids()
        detail["rejoin_s"] = round(time.monotonic() - t0, 2)
        detail["down_s"] = round(time.time() - kill_at, 2)
        phase["text"] = "after the fault"
        done = self.finish_publish(pub, where, timeout=args.timeout)
        ids = set(done["ids"])
        settled = self.wait_all(tail, ids, args.timeout, f"{where} failover", settle=args.settle)
        summary = ledger.read_ledger(tail.path)
        counts = summary.report(ids)
        events = read_events(tail.path)
        finishes = sorted(e.ts for e in events if e.event == ledger.FINISH and e.task_id in ids)
        gap, gap_start = longest_gap(finishes)
        lost_ids = sorted(summary.lost(ids))
        # When each lost task was due to be published (paced: start + index / rate;
        # a publish that stalled went out later), relative to the kill.
        order = {t: i for i, t in enumerate(done["ids"])}
        lost_at = sorted(
            round(done["started"] + order[t] / args.failover_rate - kill_at, 2) for t in lost_ids
        )
        detail.update(
            published=len(ids),
            publish_failed=done["failed"],
            publish_errors=done["errors"],
            completed=counts["completed"],
            lost=counts["lost"],
            lost_ids=lost_ids[:20],
            lost_due_s_after_kill=lost_at[:20],
            duplicates=len({t for t in summary.duplicates if t in ids}),
            extra_executions=sum(n - 1 for t, n in summary.duplicates.items() if t in ids),
            gap_s=gap,
            gap_start_after_kill_s=None if gap_start is None else round(gap_start - kill_at, 2),
            waited_for_all=settled,
        )
        if counts["lost"]:
            self.say(f"{where}: {counts['lost']} published tasks never ran")
        return detail

    # ------------------------------------------------------------- publishers
    def start_publisher(
        self,
        cfg: Config,
        name: str,
        n: int,
        step: float,
        rate: float,
        workdir: Path,
        confirms: str = "as-configured",
    ) -> Publisher:
        """Start ``python -m bench.publish`` (not waited for)."""
        assert self.workers is not None
        pub = Publisher(name, workdir)
        cmd = [
            sys.executable,
            "-m",
            "bench.publish",
            "--config",
            cfg.key,
            "--tasks",
            str(n),
            "--task-seconds",
            repr(step),
            "--rate",
            repr(rate),
            "--ids-file",
            str(pub.ids_file),
            "--result-file",
            str(pub.result_file),
            "--confirms",
            confirms,
        ]
        # The workers' environment (broker URLs, queue, and their marker, so that
        # Workers.close() finds it too), first URL = rmq0.
        with open(pub.log_file, "ab") as out:
            pub.proc = subprocess.Popen(
                cmd,
                cwd=REPO_ROOT,
                env=self.workers.env(rotation=0),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.publishers.append(pub.proc)
        self.snapshot_pids()
        return pub

    def publish(
        self,
        cfg: Config,
        name: str,
        n: int,
        step: float,
        rate: float,
        workdir: Path,
        where: str,
        confirms: str = "as-configured",
    ) -> dict[str, Any]:
        """Publish and wait for the publisher: its result."""
        pub = self.start_publisher(cfg, name, n, step, rate, workdir, confirms)
        return self.finish_publish(pub, where)

    def finish_publish(self, pub: Publisher, where: str, timeout: float = 600) -> dict[str, Any]:
        """Wait for a publisher; its result, with the ids it published."""
        assert pub.proc is not None
        try:
            code = pub.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{where}: publisher still running after {timeout:.0f} s") from None
        if code != 0 or not pub.result_file.exists():
            raise RuntimeError(f"{where}: publisher exited with {code}:\n{_tail(pub.log_file)}")
        result: dict[str, Any] = json.loads(pub.result_file.read_text())
        result["ids"] = pub.ids()
        return result

    def stop_publishers(self) -> None:
        for proc in self.publishers:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self.publishers = [p for p in self.publishers if p.poll() is None]

    # ---------------------------------------------------------------- waiting
    def wait_all(
        self,
        tail: LedgerTail,
        ids: set[str],
        timeout: float,
        what: str,
        settle: float | None = None,
    ) -> bool:
        """Until every id completed.  With ``settle``: or until nothing completed
        for ``settle`` seconds (tasks can be lost), returning False."""
        deadline = time.monotonic() + timeout
        last_count, last_change = -1, time.monotonic()
        while True:
            tail.poll()
            missing = len(tail.missing(ids))
            if missing == 0:
                return True
            now = time.monotonic()
            if missing != last_count:
                last_count, last_change = missing, now
            if settle is not None and now - last_change > settle:
                self.say(
                    f"{what}: {missing} tasks still missing after {settle:.0f} s without progress"
                )
                return False
            if now > deadline:
                if settle is not None:
                    return False
                raise TimeoutError(
                    f"{what}: {missing} of {len(ids)} tasks not done after {timeout:.0f} s"
                )
            time.sleep(0.1)

    def _line(self, where: str, phase: str, tail: LedgerTail, ids: set[str]) -> str:
        tail.poll()
        done = len(ids) - len(tail.missing(ids))
        nodes = sum(self.cluster.is_running(i) for i in range(NODES)) if self.cluster else 0
        return (
            f"{where} {phase}: {done}/{len(ids)} completed, {tail.rate(time.time()):.0f}/s, "
            f"nodes up {nodes}/{NODES}"
        )

    # ------------------------------------------------------------------ broker
    def _connection(self, cfg: Config) -> Connection:
        return Connection(self.urls[cfg.key], connect_timeout=5, failover_strategy="round-robin")

    def set_consuming(self, cfg: Config, on: bool, timeout: float = 30) -> None:
        """Every worker stops (or starts again) consuming from the queue: Celery's
        remote control (``cancel_consumer`` / ``add_consumer``, broadcast), then the
        queue's consumer count confirms it."""
        replies: Any = None
        for attempt in range(1, 4):
            control = Celery(
                f"bench-control-{cfg.key}", broker=self.urls[cfg.key], set_as_current=False
            )
            try:
                command = control.control.add_consumer if on else control.control.cancel_consumer
                replies = command(cfg.queue, reply=True, timeout=5)
                break
            except OSError as exc:
                # Seen on 3.10.8, first broadcast of a run after a node restart (in
                # both vhosts): the connection is reset while the reply queue, same
                # name as an earlier broadcast's, is redeclared.  The next one works.
                if attempt == 3:
                    raise
                log.info("remote control via %s failed (%r); retrying", cfg.key, exc)
                self.timings["remote_control_retries"] = (
                    self.timings.get("remote_control_retries", 0) + 1
                )
                time.sleep(1)
            finally:
                control.close()
        want = WORKERS if on else 0
        deadline = time.monotonic() + timeout
        while (count := self.consumers(cfg)) != want:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{cfg.key}: {count} consumers on {cfg.queue}, expected {want} "
                    f"(remote control replies: {replies})"
                )
            time.sleep(0.05)

    def consumers(self, cfg: Config) -> int:
        with self._connection(cfg) as conn:
            channel = conn.channel()
            try:
                return int(channel.queue_declare(cfg.queue, passive=True).consumer_count)
            finally:
                with contextlib.suppress(Exception):
                    channel.close()

    def queue_depth(self, cfg: Config, expected: int, timeout: float = 10) -> int | None:
        """Messages in the queue (passive declare), waiting up to ``timeout`` for
        ``expected`` (an unconfirmed publish can still be on its way)."""
        deadline = time.monotonic() + timeout
        depth: int | None = None
        with self._connection(cfg) as conn:
            channel = conn.channel()
            try:
                while True:
                    depth = channel.queue_declare(cfg.queue, passive=True).message_count
                    if depth >= expected or time.monotonic() > deadline:
                        return depth
                    time.sleep(0.1)
            finally:
                with contextlib.suppress(Exception):
                    channel.close()

    def delete_queue(self, cfg: Config) -> None:
        """Start each run from nothing: no leftover (or lost-then-found) message."""
        with self._connection(cfg) as conn:
            channel = conn.channel()
            try:
                channel.queue_delete(cfg.queue)
            finally:
                with contextlib.suppress(Exception):
                    channel.close()

    def check_queue(self, cfg: Config) -> dict[str, Any]:
        """What RabbitMQ says the queue is: type, policy, replicas."""
        assert self.cluster is not None
        cols = ["name", "type", "policy", "messages"]
        cols += ["slave_pids", "synchronised_slave_pids"] if cfg.key == "article" else ["members"]
        out = self.cluster.rabbitmqctl(
            0, "list_queues", "-p", cfg.vhost, *cols, "--formatter", "json"
        )
        rows = json.loads(out[out.index("[") :])
        row: dict[str, Any] = next((r for r in rows if r.get("name") == cfg.queue), {})
        self.say(f"{cfg.key}: queue {cfg.vhost}/{cfg.queue}: {json.dumps(row)}")
        return {"vhost": cfg.vhost, **row}

    # ------------------------------------------------------------------ close
    def close(self) -> list[str]:
        problems: list[str] = []
        self.status_line = None
        self._stop.set()
        if self._progress is not None:
            self._progress.join(timeout=10)
        with contextlib.suppress(Exception):
            self.snapshot_pids()
        self.stop_publishers()
        if self.workers is not None:
            try:
                self.workers.close()
            except Exception as exc:
                problems.append(f"workers: {exc}")
            self.workers = None
        if self.cluster is not None:
            try:
                self.cluster.close()
            except (ClusterError, OSError) as exc:
                problems.append(f"rabbitmq: {exc}")
            survivors = marked_pids(self.cluster.cluster_id)
            if survivors:
                problems.append(f"processes survived: {sorted(survivors)}")
        return problems


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


# ------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "The article's configuration (ha-all mirrored classic queue, Celery defaults) "
            "against this project's (quorum queue, app/settings.py) on one local 3-node "
            "RabbitMQ cluster: publish rate, drain rate, a broker node SIGKILLed mid-run "
            "(lost, duplicates, failover gap) and the article's sleeping workload. "
            "Writes results.json and bench.png to --out and prints a table."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--runs", type=positive_int, default=3, help="runs per configuration (medians, min-max)")
    add(
        "--publish-tasks",
        type=positive_int,
        default=5000,
        help="no-op tasks published, then drained",
    )
    add(
        "--sleep-tasks",
        type=positive_int,
        default=300,
        help="tasks of the sleeping workload (the article queued 10,000; 1000 takes ~3 min "
        "per article run here)",
    )
    add(
        "--sleep-seconds",
        type=non_negative_float,
        default=1.0,
        help="how long each sleeps (the article: 10 s)",
    )
    add(
        "--failover-tasks",
        type=positive_int,
        default=600,
        help="tasks published during the node kill",
    )
    add("--failover-rate", type=positive_float, default=40.0, help="their publish rate (tasks/s)")
    add("--failover-task-seconds", type=non_negative_float, default=0.1, help="how long each runs")
    add(
        "--fault-at",
        type=fraction,
        default=argparse.SUPPRESS,
        help="kill once this fraction of the failover tasks completed (default: 1/3)",
    )
    add(
        "--down-seconds",
        type=non_negative_float,
        default=5.0,
        help="node down this long, then restarted",
    )
    add(
        "--settle",
        type=positive_float,
        default=20.0,
        help="failover: stop waiting after this long without a completion (tasks may be lost)",
    )
    add("--timeout", type=positive_float, default=300.0, help="give up a phase after this long")
    add("--out", default="out/bench", help="output directory")
    add("-v", "--verbose", action="store_true", help="log the cluster's steps")
    args = parser.parse_args(argv)
    if not hasattr(args, "fault_at"):  # SUPPRESS: shown as 1/3 in --help, not 0.333...
        args.fault_at = 1 / 3
    return args


_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _signals(handler: Any) -> Iterator[None]:
    previous = {s: signal.signal(s, handler) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    bench = Bench(args)
    status = "ok"
    error: BaseException | None = None
    started = time.time()
    try:
        with _signals(_interrupt):
            bench.execute()
    except (Interrupted, KeyboardInterrupt) as exc:
        status, error = "interrupted", exc
    except Exception as exc:
        status, error = "error", exc
    finally:
        # Children run in their own sessions (a terminal's Ctrl-C reaches only us):
        # cleanup must not be interrupted half-way.
        with _signals(signal.SIG_IGN):
            bench.say("stopping every process started (by PID)")
            problems = bench.close()
    if error is not None:
        if status == "error":
            traceback.print_exception(error, file=sys.stderr)
        problems.insert(0, f"{status}: {error!r}")
    results = build_results(
        args=args,
        argv=sys.argv[1:] if argv is None else argv,
        status=status,
        problems=problems,
        configs={k: c.settings | {"title": c.title} for k, c in bench.configs.items()},
        runs=bench.runs,
        checks=bench.checks,
        timings=bench.timings | {"total_s": round(time.time() - started, 1)},
        rabbitmq_version=bench.cluster.version if bench.cluster else None,
        pids=sorted(bench.seen_pids),
    )
    bench.out.mkdir(parents=True, exist_ok=True)
    (bench.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if any(bench.runs.values()):
        plot_results(bench.out / "bench.png", results)
    print(format_table(results))
    bench.say(f"wrote {bench.out / 'results.json'} and {bench.out / 'bench.png'}")
    if status == "interrupted":
        return 130
    return 2 if problems else 0
