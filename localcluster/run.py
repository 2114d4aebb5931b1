"""``python -m localcluster`` (``make local``): the whole system on this machine, one
fault, the numbers.

1. renders the prod stack with the run's options (worker replicas and concurrency, the
   scheduler Job's tasks) and boots its RabbitMQ StatefulSet as three pods (the pod
   twin: :mod:`localcluster.twin`), clustered by Kubernetes peer discovery;
2. starts the run's Prometheus (:mod:`localcluster.prometheus`: Debian's prometheus as
   a pod, scraping the RabbitMQ pods and the worker pods as the PodMonitorings say, the
   alert rules at the twin's size) and the worker Deployment's replicas as pods, all
   writing one ledger on a directory the run shares with its pods (``TASK_LEDGER``);
3. runs the scheduler Job's pod: it publishes ``--tasks`` ``count`` tasks and writes
   the ids RabbitMQ confirmed;
4. once ``--fault-at`` of them completed, injects ``--fault`` (:mod:`localcluster.faults`:
   one object per fault, each returning what it did), which brings the broken part
   back ``--down-seconds`` later;
5. waits until every confirmed task completed (or ``--timeout``), with a live
   progress line on stderr;
6. removes everything the run made (pods, namespaces, bridge, cgroups, mounts,
   directories; also on failure, Ctrl-C or SIGTERM) and checks that nothing is left,
   then prints the report and writes ``report.json`` and ``timeline.png`` to ``--out``
   (:func:`localcluster.report.build_report`, a pure function), with the alerts that
   fired (read from Prometheus just before it is removed). The ledger, the ids and
   every pod's log (Prometheus' too) are kept in ``--out``/logs.

Exit status: 0 when every confirmed task completed and nothing was left behind; 1 if
a task was lost; 2 on an error (the report says which); 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from app import ledger
from app.settings import DEFAULT_QUEUE, ENV_QUEUE
from localcluster import prometheus, twin, twin_engine
from localcluster.cli_types import (
    fraction,
    non_negative_float,
    non_negative_floats,
    positive_int,
)
from localcluster.console import Console, Outcome, run_guarded
from localcluster.faults import FAULTS, FaultRecord
from localcluster.partition import PartitionUnavailableError, check_available
from localcluster.report import (
    LedgerTail,
    RunFacts,
    Timeline,
    build_report,
    machine_info,
    plot_timeline,
    summarize_runs,
    utc_now,
)
from localcluster.twin_engine import PodWorkers, RabbitPods, SchedulerPod

log = logging.getLogger("localcluster")

# Sized on a 2-core / 23 GB machine: 3 workers x 10 threads run 30 tasks of
# 1 s at once; the cluster's throughput there is ~28 tasks/s (CPU-bound on the
# brokers and workers), so 2400 tasks take ~85 s of work plus ~35 s of boot.
DEFAULT_WORKERS = 3
DEFAULT_CONCURRENCY = 10
DEFAULT_TASKS = 2400
DEFAULT_STEP_SECONDS = 0.1
DEFAULT_FAULT_AT = 1 / 3
DEFAULT_DOWN_SECONDS = 5.0
# A lost machine stays lost about as long as Kubernetes takes to notice (node
# monitor grace period 40 s) and replace its pod.
DEFAULT_LOST_MACHINE_SECONDS = 60.0
TARGETS = ("worker", "scheduler", "leader")
#: The marks of a run's boot, kept across its batches.
BOOT_MARKS = ("begin", "cluster_ready", "workers_ready")
DEFAULT_TIMEOUT = 600.0


class LocalRun:
    """One run: boot, fault, wait; :meth:`close` is safe at any point. It is the
    :class:`~localcluster.faults.FaultContext` its fault acts through."""

    def __init__(self, args: argparse.Namespace, console: Console) -> None:
        self.args = args
        self.console = console
        self.out = Path(args.out)
        self.logs = self.out / "logs"
        self.down_seconds: float = args.down_seconds
        self.target: str = args.target
        self.queue = DEFAULT_QUEUE
        self.vhost = ""
        self.twin: twin.StatefulSetTwin | None = None
        self.nodes: RabbitPods
        self.workers: PodWorkers
        self.tail = LedgerTail(self.logs / "ledger.jsonl")
        self.ledger_path = self.logs / "ledger.jsonl"
        self.ids_path = self.logs / "ids.txt"
        #: Task ids of the batches before this one (a run may run several, on one boot).
        self.earlier_ids: set[str] = set()
        self.batches = 0
        self.scheduler: SchedulerPod | None = None
        self.scheduler_exit: int | None = None
        self.marks: dict[str, float] = {}  # wall-clock (time.time()) of each step
        self.record = FaultRecord(args.fault)
        self.timed_out = False
        self.twin_info: dict[str, Any] = {}
        self.leftovers: dict[str, list[str]] = {}
        self.phase = "starting"
        self.confirms: list[tuple[float, int]] = []
        self._watching = threading.Event()
        #: With ``--repeat``: each finished batch's report and timeline.
        self.finished: list[tuple[dict[str, Any], Timeline]] = []
        #: The run's Prometheus (a pod of the twin), what it was and what fired.
        self.prometheus: prometheus.RunPrometheus | None = None
        self.prometheus_info: dict[str, Any] = {}
        self.alerts: list[prometheus.AlertInterval] | None = None

    # ------------------------------------------------------- the fault's context
    def say(self, message: str) -> None:
        self.console.say(message)

    def set_phase(self, phase: str) -> None:
        self.phase = phase

    def recording(self, record: FaultRecord) -> FaultRecord:
        self.record = record
        return record

    def clients(self) -> dict[str, int]:
        found = {w.name: w.pid for w in self.workers.procs if w.alive()}
        if self.scheduler is not None and self.scheduler_exit is None and self.scheduler.proc.pid:
            found["scheduler"] = self.scheduler.proc.pid
        return found

    def published(self) -> int:
        return len(self.scheduler.published_ids()) if self.scheduler else 0

    def completed(self) -> int:
        if self.scheduler is None:
            return 0
        ids = self.scheduler.published_ids()
        return len(ids) - len(self.tail.missing(ids))

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.check_scheduler()
            time.sleep(min(0.2, left))

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

    # ------------------------------------------------------------------- output
    def progress_line(self) -> str:
        now = time.time()
        self.tail.poll()
        nodes = sum(self.nodes.is_running(i) for i in range(len(self.nodes.node_names)))
        workers = sum(w.alive() for w in self.workers.procs)
        elapsed = now - self.marks.get("publish", now)
        return (
            f"t={elapsed:6.1f}s done {self.completed():>6}/{self.published():<6} of "
            f"{self.args.tasks} rate {self.tail.rate(now):6.1f}/s  nodes up {nodes}/"
            f"{len(self.nodes.node_names)}  workers up {workers}  [{self.phase}]"
        )

    # -------------------------------------------------------------------- steps
    def execute(self) -> None:
        """What ``make local`` does: boot, then a batch of tasks with its fault, ``--repeat``
        times on the one boot (each batch's report built as it ends, while its pods run)."""
        self.boot()
        plan = [value for value in self.args.down_seconds_list for _ in range(self.args.repeat)]
        for n, down_seconds in enumerate(plan, start=1):
            if len(plan) > 1:
                self.say(f"batch {n} of {len(plan)} (--down-seconds {down_seconds:g})")
                self.args = argparse.Namespace(**{**vars(self.args), "down_seconds": down_seconds})
            self.batch()
            if len(plan) > 1:
                self.finished.append(build_report(self.facts("ok", [])))

    def boot(self) -> None:
        """The cluster, Ready: RabbitMQ pods clustered, worker pods Ready."""
        self._clean_logs()
        self.marks["begin"] = time.time()
        self.phase = "booting RabbitMQ"
        self._boot()
        self.marks["workers_ready"] = time.time()

    def batch(self) -> None:
        """``--tasks`` published by a scheduler pod, ``--fault`` injected once
        ``--fault-at`` of them completed, then wait until every confirmed one completed.
        A run may run several batches on one boot (each with its own ``args``)."""
        args = self.args
        assert self.twin is not None, "boot() first"
        if self.batches:
            self.earlier_ids |= set(ledger.read_ids(self.ids_path))
            self.marks = {k: v for k, v in self.marks.items() if k in BOOT_MARKS}
        self.batches += 1
        self.down_seconds, self.target = args.down_seconds, args.target
        self.scheduler, self.scheduler_exit, self.timed_out = None, None, False
        self.record = FaultRecord(args.fault)
        self.confirms = []
        self._watching = threading.Event()
        self.ids_path = self.workers.shared / f"ids-{self.batches}.txt"
        self.phase = "running"
        self.marks["publish"] = time.time()
        self.scheduler = self.workers.scheduler(self.ids_path, rate=args.rate, tasks=args.tasks)
        threading.Thread(target=self._count_confirms, args=(self._watching,), daemon=True).start()
        self.console.show(self.progress_line)
        deadline = time.monotonic() + args.timeout
        if args.fault != "none":
            target = max(1, math.ceil(args.tasks * args.fault_at))
            self.wait_for(
                f"{target} completed tasks",
                lambda: self.all_done() or self.completed() >= target,
                deadline - time.monotonic(),
            )
        self.record = FAULTS[args.fault].inject(self)
        self.phase = "draining" if args.fault == "none" else "after the fault"
        with contextlib.suppress(TimeoutError):
            self.wait_for(
                "every confirmed task to complete",
                self.all_done,
                max(0.0, deadline - time.monotonic()),
            )
        if not self.all_done():
            self.say(f"gave up waiting after --timeout {args.timeout:.0f} s")
            self.timed_out = True
        self.marks["end"] = time.time()
        self._watching.set()
        self.console.show(None)  # until the next batch: nothing moves
        self.phase = "done"

    def _boot(self) -> None:
        """The prod stack's StatefulSet, worker Deployment and scheduler Job as pods."""
        args = self.args
        stack = twin_engine.STACK
        self.say(f"rendering stack {stack} and booting its RabbitMQ StatefulSet as pods")
        run_overrides = twin_engine.overrides(
            stack,
            workers=args.workers,
            concurrency=args.concurrency,
            tasks=args.tasks,
            task_seconds=args.task_seconds,
        )
        self.twin = twin.StatefulSetTwin(stack, overrides=run_overrides)
        self.nodes = RabbitPods(self.twin)
        self.workers = PodWorkers(self.twin, args.task_seconds)
        worker_env = self.twin.worker_env()
        self.queue = worker_env.get(ENV_QUEUE, DEFAULT_QUEUE)
        self.vhost = unquote(urlsplit(self.twin.broker_urls()[0]).path.lstrip("/"))
        # The pods write the ledger on the run's shared directory; read it live.
        self.ledger_path = self.workers.ledger
        self.tail = LedgerTail(self.ledger_path)
        self.nodes.start()
        self.marks["cluster_ready"] = time.time()
        ready = {n: round(p.wait_ready(0), 1) for n, p in self.twin.pods.items()}
        adaptation = self._start_prometheus(stack, run_overrides)
        self.twin_info = {
            "stack": stack,
            "rabbitmq_version": self.nodes.version,
            "run_id": self.twin.run_id,
            "pods_ready_s": ready,
            "mounted_files_sha256": self.nodes.mounted_files(),
            "adaptations": {**self.twin.adaptations, **adaptation},
        }
        self.say(
            f"run {self.twin.run_id}: RabbitMQ {self.nodes.version} pods Ready after {ready} s, "
            f"clustered by Kubernetes peer discovery after "
            f"{self.nodes.timings['clustered']:.1f} s"
        )
        self.phase = "starting workers"
        started = self.workers.start_replicas()
        self.say(
            f"{len(started)} worker pods Ready ({args.concurrency} threads each, "
            "broker list rotated by pod name)"
        )
        if self.prometheus is not None:
            waited = self.prometheus.wait_scraping()
            self.say(f"Prometheus scrapes every RabbitMQ and worker pod ({waited:.1f} s more)")

    def _start_prometheus(self, stack: str, overrides: dict[str, Any]) -> dict[str, str]:
        """The run's Prometheus, once the RabbitMQ pods are Ready: the rules at the twin's
        size (returned as the adaptation the report lists)."""
        assert self.twin is not None
        args, stack_monitoring = prometheus.monitoring_args(stack, overrides, self.vhost)
        self.prometheus = prometheus.RunPrometheus(self.twin, args)
        took = self.prometheus.start()
        # The worker pods it scrapes follow the run's (Ready, replaced, deleted).
        self.workers.on_scraped = self.prometheus.scrape_workers
        sized = args.monitoring
        self.prometheus_info = {
            "prometheus": self.prometheus.version,
            "scrape_interval_s": sized.scrape_interval_seconds,
            "evaluation_interval_s": self.prometheus.evaluation_seconds,
            "node_down_for_s": sized.node_down_seconds,
            "worker_down_for_s": sized.worker_down_seconds if args.worker_metrics else None,
            "started_s": round(took, 2),
        }
        self.say(
            f"Prometheus {self.prometheus.version} Ready after {took:.1f} s at "
            f"{self.prometheus.url} (scrape and evaluation every "
            f"{sized.scrape_interval_seconds} s, RabbitMQNodeDown after "
            f"{sized.node_down_seconds} s, CeleryWorkerDown after "
            f"{sized.worker_down_seconds} s)"
        )
        return {"Managed Prometheus": prometheus.twin_adaptation(stack_monitoring, sized)}

    def read_alerts(self) -> None:
        """What fired so far, from the run's Prometheus while it runs (kept for the
        report once :meth:`close` removed it)."""
        if self.prometheus is None:
            return
        if not self.prometheus.running():
            self.prometheus_info["error"] = "not running (its log: logs/prometheus.log)"
            return
        since = self.marks.get("begin", time.time())
        try:
            self.alerts = self.prometheus.alerts(since)
            self.prometheus_info.pop("error", None)
        except (OSError, ValueError, KeyError, prometheus.PrometheusError) as exc:
            self.prometheus_info["error"] = f"reading the alerts: {exc!r}"

    def _count_confirms(self, stop: threading.Event, every: float = 0.2) -> None:
        """When the scheduler's confirmed count grew (its ids file), until it exits."""
        scheduler = self.scheduler
        assert scheduler is not None
        while not stop.wait(every):
            count = len(scheduler.published_ids())
            if not self.confirms or count != self.confirms[-1][1]:
                self.confirms.append((time.time(), count))
            if scheduler.proc.poll() is not None and count == len(scheduler.published_ids()):
                return

    def _clean_logs(self) -> None:
        """Remove what a previous run left in --out/logs (only our own file names)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        for pattern in ("ledger.jsonl", "ids.txt", "*.log"):
            for path in self.logs.glob(pattern):
                path.unlink()
        for pattern in ("report.json", "timeline.png", "report-*.json", "timeline-*.png"):
            for path in self.out.glob(pattern):
                path.unlink()

    # ------------------------------------------------------------------ cleanup
    def _keep_files(self) -> None:
        """The ledger, the ids and the pods' logs live in the run's directory, which
        :meth:`close` removes: copy them to --out/logs first."""
        assert self.twin is not None
        for source, name in ((self.ledger_path, "ledger.jsonl"), (self.ids_path, "ids.txt")):
            if source.exists() and source.parent != self.logs:
                shutil.copyfile(source, self.logs / name)
        self.ledger_path, self.ids_path = self.logs / "ledger.jsonl", self.logs / "ids.txt"
        for name, pod in {**self.twin.pods, **self.twin.extra_pods}.items():
            with contextlib.suppress(OSError):
                (self.logs / f"{name}.log").write_text(pod.tail(lines=400) + "\n")

    def close(self, failed: bool) -> list[str]:
        """Remove everything the run made; return the problems found."""
        self._watching.set()
        if self.twin is None:
            return []
        problems: list[str] = []
        self.read_alerts()
        if "error" in self.prometheus_info:
            problems.append(f"Prometheus: {self.prometheus_info['error']}")
        try:
            self._keep_files()
        except Exception as exc:
            problems.append(f"keeping the ledger: {exc}")
        try:
            self.twin.close()  # the Prometheus pod too: killed by PID, its TSDB removed
        except (OSError, twin.TwinError) as exc:
            problems.append(f"removing the pods: {exc}")
        self.prometheus = None
        self.leftovers = {k: v for k, v in self.twin.leftovers().items() if v}
        if self.leftovers:
            problems.append(f"left behind: {self.leftovers}")
        return problems

    # ------------------------------------------------------------------- report
    def facts(self, status: str, problems: list[str]) -> RunFacts:
        """What the (last) batch measured: its ids, and the ledger without the lines of
        earlier batches (read live, or from the files :meth:`close` kept)."""
        args = self.args
        self.read_alerts()
        ids_file, ledger_file = self.ids_path, self.ledger_path
        lines = ledger_file.read_text(errors="replace").splitlines() if ledger_file.exists() else []
        if self.earlier_ids:
            lines = [line for line in lines if not _about(line, self.earlier_ids)]
        return RunFacts(
            status=status,
            problems=problems,
            params={
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
            ids=ledger.read_ids(ids_file) if ids_file.exists() else [],
            ledger_lines=lines,
            fault=self.record,
            marks=self.marks,
            scheduler_exit=self.scheduler_exit,
            timed_out=self.timed_out,
            machine=machine_info(self.twin_info.get("rabbitmq_version")),
            date=utc_now(),
            twin=self.twin_info,
            leftovers=self.leftovers,
            logs=str(self.logs),
            confirms=list(self.confirms),
            alerts=None if self.alerts is None else list(self.alerts),
            prometheus=dict(self.prometheus_info),
        )


def _about(line: str, task_ids: set[str]) -> bool:
    """Whether a ledger line is about one of ``task_ids``."""
    try:
        return json.loads(line).get("task_id") in task_ids
    except (ValueError, AttributeError):
        return False


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
        choices=list(FAULTS),
        default="broker-kill",
        help="; ".join(f"{name}: {fault.help}" for name, fault in FAULTS.items()),
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
        type=non_negative_floats,
        default=argparse.SUPPRESS,
        help=f"how long the broken part stays broken before it is brought back (default: "
        f"{DEFAULT_LOST_MACHINE_SECONDS:.0f} for the machine-loss faults, "
        f"{DEFAULT_DOWN_SECONDS:.0f} otherwise); several, comma-separated (2,4,6): a sweep, "
        "a batch each (times --repeat) on one boot",
    )
    parser.add_argument(
        "--target",
        choices=TARGETS,
        default="worker",
        help="which RabbitMQ pod machine-loss hits: the one worker w0 is connected to, the "
        "scheduler's, or the leader of the workers' quorum queue",
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
        "--repeat",
        type=positive_int,
        default=1,
        help="run the batch and its fault this many times on one boot; report.json then "
        "holds each run's numbers and their medians (report-N.json, timeline-N.png: run N)",
    )
    parser.add_argument("--out", default="out/local", help="output directory")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the cluster's steps")
    args = parser.parse_args(argv)
    if not hasattr(args, "fault_at"):  # SUPPRESS: shown as 1/3 in --help, not 0.333...
        args.fault_at = DEFAULT_FAULT_AT
    if not hasattr(args, "down_seconds"):
        lost_machine = args.fault in ("machine-loss", "worker-machine-loss")
        default = DEFAULT_LOST_MACHINE_SECONDS if lost_machine else DEFAULT_DOWN_SECONDS
        args.down_seconds = [default]
    args.down_seconds_list = args.down_seconds
    args.down_seconds = args.down_seconds_list[0]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    console = Console("localcluster", every_pipe=1.0)
    if os.geteuid() != 0:
        console.say(
            "error: the pod twin needs root (network namespaces, cgroups, mounts): "
            "run it as root; nothing was started"
        )
        return 2
    if args.fault == "partition":
        try:
            check_available()
        except PartitionUnavailableError as exc:  # nothing started, nothing to report
            console.say(f"error: {exc}; nothing was started")
            return 2
    run = LocalRun(args, console)
    outcome = run_guarded(run.execute, run.close, console)
    if args.repeat > 1 or len(args.down_seconds_list) > 1:
        return _repeated(run, outcome)
    try:
        report, timeline = build_report(run.facts(outcome.status, outcome.problems))
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        plot_timeline(run.out / "timeline.png", timeline)
    except Exception:
        log.exception("could not write the report")
        return 2
    print(json.dumps(report, indent=2))
    gap = "longest" if args.fault == "none" else "failover"
    run.console.say(
        f"{report['fault']}: submitted {report['submitted']}, completed "
        f"{report['completed_unique']}, lost {report['lost']}, duplicates "
        f"{report['duplicates']}, {gap} gap {report['failover_gap_s']} s, rejoin "
        f"{report['rejoin_s']} s, throughput {report['throughput_per_s']}; "
        f"wrote {run.out / 'report.json'} and {run.out / 'timeline.png'}"
    )
    if outcome.exit_interrupted:
        return 130
    if report["lost"] > 0 or run.timed_out:
        return 1
    if outcome.problems or report["submitted"] != args.tasks:
        return 2
    return 0


def _repeated(run: LocalRun, outcome: Outcome) -> int:
    """``--repeat N``: report-N.json and timeline-N.png per batch, report.json the summary."""
    args = run.args
    try:
        finished = list(run.finished)
        if run.batches > len(finished):  # the batch that failed or was interrupted
            finished.append(build_report(run.facts(outcome.status, outcome.problems)))
        run.out.mkdir(parents=True, exist_ok=True)
        for n, (report, timeline) in enumerate(finished, start=1):
            (run.out / f"report-{n}.json").write_text(json.dumps(report, indent=2) + "\n")
            plot_timeline(run.out / f"timeline-{n}.png", timeline)
        reports = [report for report, _ in finished]
        summary = summarize_runs(reports)
        if len(args.down_seconds_list) > 1:  # a sweep: the medians per --down-seconds
            summary["by_down_seconds"] = [
                {"down_seconds": value, **summarize_runs(same)}
                for value in args.down_seconds_list
                if (same := [r for r in reports if r["params"]["down_seconds"] == value])
            ]
        summary.update(status=outcome.status, problems=outcome.problems)
        (run.out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    except Exception:
        log.exception("could not write the report")
        return 2
    print(json.dumps(summary, indent=2))
    run.console.say(
        f"{summary['fault']} x{summary['runs']}: lost {summary['lost_total']} of "
        f"{summary['submitted_total']}; medians {summary['median']}; wrote {run.out}/report.json "
        f"and report-N.json, timeline-N.png"
    )
    if outcome.exit_interrupted:
        return 130
    if summary["lost_total"] > 0 or any(r["fault_detail"].get("timed_out") for r, _ in finished):
        return 1
    if outcome.problems or len(finished) < args.repeat * len(args.down_seconds_list):
        return 2
    return 0
