"""The numbers and the picture of a local run (``python -m localcluster``).

Everything here is computed from the run's ledger (``app/ledger.py``: one
``start`` and one ``finish`` line per task execution, with wall-clock ``ts``),
the ids the scheduler had confirmed (``--ids-file``) and the wall-clock times of
the fault (``fault``: the kill, ``restart``: bringing the node/worker back,
``rejoin``: it is back, clustered/ready).  Pure functions, plus
:class:`LedgerTail` (an incremental, thread-safe reader for live progress) and
:func:`plot_timeline` (matplotlib, Agg backend: no display needed).
"""

from __future__ import annotations

import bisect
import datetime as dt
import itertools
import json
import math
import os
import platform
import socket
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app import ledger

if TYPE_CHECKING:
    from localcluster.faults import FaultRecord
    from localcluster.prometheus import AlertInterval

__all__ = [
    "Event",
    "LedgerTail",
    "RunFacts",
    "Timeline",
    "alerts_section",
    "build_report",
    "completions_per_second",
    "longest_gap",
    "machine_info",
    "phase_throughput",
    "plot_timeline",
    "read_events",
    "throughput",
]


@dataclass(frozen=True)
class Event:
    """One ledger line: a task execution starting or finishing on a worker."""

    ts: float
    event: str
    task_id: str
    worker: str


def _parse(line: str) -> Event | None:
    try:
        rec = json.loads(line)
        return Event(float(rec["ts"]), str(rec["event"]), str(rec["task_id"]), str(rec["worker"]))
    except (ValueError, KeyError, TypeError):
        return None


def read_events(path: str | os.PathLike[str]) -> list[Event]:
    """Every well-formed ledger line, in file order (a missing file: none)."""
    p = Path(path)
    if not p.exists():
        return []
    with p.open(encoding="utf-8", errors="replace") as fh:
        return [e for e in map(_parse, fh) if e is not None]


@dataclass
class LedgerTail:
    """Reads the lines appended to a ledger since the last :meth:`poll`.

    Only complete lines are consumed (a line being written is read next time).
    Safe to poll from several threads.
    """

    path: Path
    finished: set[str] = field(default_factory=set)
    finish_times: list[float] = field(default_factory=list)  # every finish, sorted
    running: dict[str, set[str]] = field(default_factory=dict)  # worker -> started, unfinished
    starts: dict[str, list[tuple[float, str]]] = field(default_factory=dict)  # id -> (ts, worker)
    _offset: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def poll(self) -> None:
        with self._lock:
            try:
                with open(self.path, "rb") as fh:
                    fh.seek(self._offset)
                    data = fh.read()
            except FileNotFoundError:
                return
            end = data.rfind(b"\n") + 1
            self._offset += end
            for raw in data[:end].decode(errors="replace").splitlines():
                event = _parse(raw)
                if event is None:
                    continue
                if event.event == ledger.START:
                    self.running.setdefault(event.worker, set()).add(event.task_id)
                    self.starts.setdefault(event.task_id, []).append((event.ts, event.worker))
                elif event.event == ledger.FINISH:
                    self.finished.add(event.task_id)
                    bisect.insort(self.finish_times, event.ts)
                    self.running.get(event.worker, set()).discard(event.task_id)

    def completed(self) -> int:
        with self._lock:
            return len(self.finished)

    def missing(self, ids: Iterable[str]) -> set[str]:
        with self._lock:
            return set(ids) - self.finished

    def in_flight(self, worker_prefix: str) -> set[str]:
        """Tasks a worker (``name@``) started that no worker has finished (a dead
        worker's tasks that ran again elsewhere are not in flight any more)."""
        with self._lock:
            found: set[str] = set()
            for worker, ids in self.running.items():
                if worker.startswith(worker_prefix):
                    found |= ids
            return found - self.finished

    def redelivered_after(
        self, ids: Iterable[str], worker_prefix: str, since: float
    ) -> float | None:
        """Seconds after ``since`` until every one of ``ids`` had started again on a worker
        other than ``worker_prefix`` (None: not all of them did, or there were none)."""
        self.poll()
        with self._lock:
            latest = since
            wanted = list(ids)
            for task_id in wanted:
                again = [
                    ts
                    for ts, worker in self.starts.get(task_id, [])
                    if ts >= since and not worker.startswith(worker_prefix)
                ]
                if not again:
                    return None
                latest = max(latest, min(again))
            return round(latest - since, 2) if wanted else None

    def restarted_elsewhere(self, ids: Iterable[str], worker_prefix: str) -> bool:
        """Every one of ``ids`` has started on a worker other than ``worker_prefix``."""
        return self.redelivered_after(ids, worker_prefix, 0.0) is not None

    def rate(self, now: float, window: float = 5.0) -> float:
        """Task executions finished per second over the last ``window`` seconds."""
        with self._lock:
            recent = len(self.finish_times) - bisect.bisect_left(self.finish_times, now - window)
        return recent / window


def longest_gap(times: Sequence[float]) -> tuple[float, float | None]:
    """(longest stretch between two consecutive times, where it started)."""
    ordered = sorted(times)
    best, start = 0.0, None
    for a, b in itertools.pairwise(ordered):
        if b - a > best:
            best, start = b - a, a
    return best, start


def throughput(times: Sequence[float], start: float, end: float) -> float | None:
    """Completions per second in [start, end); None for an empty window."""
    if end - start <= 0:
        return None
    lo = bisect.bisect_left(times, start)
    hi = bisect.bisect_left(times, end)
    return (hi - lo) / (end - start)


def phase_throughput(
    first_finishes: Sequence[float],
    begin: float,
    fault: float | None,
    rejoin: float | None,
    end: float,
) -> dict[str, float | None]:
    """Unique completions per second before the fault, during it (until the
    node/worker is back) and after it.  ``end`` is the last completion: the
    "after" window stops there (an idle tail would dilute it).  A phase with no
    duration (no fault; everything done before the rejoin) is None."""
    times = sorted(first_finishes)
    end_closed = math.nextafter(end, math.inf)  # count the last completion
    if fault is None:
        return {"before": throughput(times, begin, end_closed), "during": None, "after": None}
    back = rejoin if rejoin is not None else end_closed
    return {
        "before": throughput(times, begin, fault),
        "during": throughput(times, fault, min(back, end_closed)),
        "after": throughput(times, back, end_closed) if back < end_closed else None,
    }


def completions_per_second(times: Iterable[float], begin: float, end: float) -> list[int]:
    """Histogram of ``times`` in one-second bins from ``begin`` to ``end``."""
    bins = [0] * max(1, math.ceil(end - begin))
    for t in times:
        i = int(t - begin)
        if 0 <= i < len(bins):
            bins[i] += 1
    return bins


@dataclass(frozen=True)
class RunFacts:
    """Everything one run measured, as :func:`build_report` takes it: no files, no clock."""

    status: str  # ok, interrupted or error
    problems: Sequence[str]
    params: Mapping[str, Any]  # the run's options (--tasks, --workers ...)
    ids: Sequence[str]  # what the scheduler had confirmed
    ledger_lines: Sequence[str]  # the workers' ledger, every line
    fault: FaultRecord
    marks: Mapping[str, float]  # the run's own steps: begin, cluster_ready, publish ...
    scheduler_exit: int | None
    timed_out: bool
    machine: Mapping[str, Any]
    date: str
    twin: Mapping[str, Any]  # stack, RabbitMQ version, run id, mounted files, adaptations
    leftovers: Mapping[str, Sequence[str]]  # what close() found still there
    logs: str
    #: (time, tasks confirmed so far), each time the scheduler's count grew.
    confirms: Sequence[tuple[float, int]] = ()
    #: Every stretch an alert fired, as the run's Prometheus evaluated the rules (None: no
    #: Prometheus ran, or it could not be read).
    alerts: Sequence[AlertInterval] | None = None
    #: What that Prometheus was: its version, the rule parameters it ran with, an error.
    prometheus: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Timeline:
    """What :func:`plot_timeline` draws."""

    first_finishes: Sequence[float]
    all_finishes: Sequence[float]
    begin: float
    end: float
    marks: Mapping[str, float]
    gap: tuple[float, float | None]
    title: str
    gap_label: str
    #: (alert, its labels, fired, resolved or None: still firing), as the report lists them.
    alerts: Sequence[tuple[str, str, float, float | None]] = ()


def _finishes_by_worker(events: Iterable[Event]) -> dict[str, list[float]]:
    """Finish times by worker nodename (``celery@<pod>``: the pods share the prefix)."""
    by_worker: dict[str, list[float]] = {}
    for e in events:
        if e.event == ledger.FINISH:
            by_worker.setdefault(e.worker, []).append(e.ts)
    return by_worker


def _between(marks: Mapping[str, float], a: str, b: str) -> float | None:
    return round(marks[b] - marks[a], 2) if a in marks and b in marks else None


def _after(moment: float | None, since: float | None) -> float | None:
    return None if moment is None or since is None else round(moment - since, 2)


def alerts_section(
    intervals: Sequence[AlertInterval], fault: FaultRecord, begin: float
) -> list[dict[str, Any]]:
    """Each alert that fired during the batch (from ``begin``; one that resolved before it
    was an earlier batch's or the boot's): when it fired after the fault was injected,
    when it resolved after the broken part was restarted and after it was back (None:
    still firing when the run ended), and the same from ``begin``."""
    found = []
    for a in sorted(intervals, key=lambda a: (a.fired, a.alert)):
        if a.resolved is not None and a.resolved <= begin:
            continue
        found.append(
            {
                "alert": a.alert,
                "severity": a.severity,
                "labels": dict(a.labels),
                "fired_after_fault_s": _after(a.fired, fault.injected),
                "resolved_after_restart_s": _after(a.resolved, fault.restarted),
                "resolved_after_back_s": _after(a.resolved, fault.back),
                "firing_s": _after(a.resolved, a.fired),
                "fired_s": _after(a.fired, begin),
                "resolved_s": _after(a.resolved, begin),
            }
        )
    return found


def _alert_label(alert: Mapping[str, Any]) -> str:
    labels = ", ".join(f"{k}={v}" for k, v in sorted(alert["labels"].items()))
    return f"{alert['alert']}{{{labels}}}" if labels else alert["alert"]


def build_report(facts: RunFacts) -> tuple[dict[str, Any], Timeline]:
    """The report (``report.json``) and the timeline of one run, from what it measured."""
    params = facts.params
    record = facts.fault
    ids = list(facts.ids)
    summary = ledger.summarize(facts.ledger_lines)
    counts = summary.report(ids)
    events = [e for e in map(_parse, facts.ledger_lines) if e is not None]
    all_finishes = sorted(e.ts for e in events if e.event == ledger.FINISH)
    first_finishes = sorted(summary.first_finish[t] for t in set(ids) & summary.completed)
    marks = {**facts.marks, **record.marks()}
    begin = marks.get("publish", marks.get("begin", 0.0))
    end = all_finishes[-1] if all_finishes else marks.get("end", begin)
    whole_run_gap = longest_gap(all_finishes)
    fault_at = record.injected
    # From the fault on (the fault instant counts as a start: a pause right after it
    # is the failover's); the whole run without a fault.
    gap = (
        whole_run_gap
        if fault_at is None
        else longest_gap([fault_at, *(t for t in all_finishes if t >= fault_at)])
    )
    detail: dict[str, Any] = {"kind": record.kind}
    for key in ("target", "found_by", "at_completed"):
        if (value := getattr(record, key)) is not None:
            detail[key] = value
    detail.update(record.detail)
    if record.rejoin_s is not None:
        detail["rejoin_s"] = record.rejoin_s
    if record.in_flight_ids is not None:
        in_flight = record.in_flight_ids
        detail["in_flight"] = len(in_flight)
        detail["in_flight_redelivered"] = sum(summary.starts[t] >= 2 for t in in_flight)
        detail["in_flight_completed"] = sum(t in summary.completed for t in in_flight)
    if facts.timed_out:
        detail["timed_out"] = True
    rejoin = record.back
    # Each worker's own stall, and the scheduler's (no confirm while it still had tasks
    # to publish), from the fault on.
    by_worker = _finishes_by_worker(events)
    stall_by_worker = (
        None
        if fault_at is None
        else {
            worker: round(longest_gap([fault_at, *(t for t in times if t >= fault_at)])[0], 3)
            for worker, times in sorted(by_worker.items())
        }
    )
    confirm_times = [t for t, _ in facts.confirms]
    scheduler_stall = (
        None
        if fault_at is None or not confirm_times or confirm_times[-1] < fault_at
        else round(longest_gap([fault_at, *(t for t in confirm_times if t >= fault_at)])[0], 3)
    )
    gap_label = "longest gap" if fault_at is None else "failover gap"
    fired = None if facts.alerts is None else alerts_section(facts.alerts, record, begin)
    report: dict[str, Any] = {
        "status": facts.status,
        "fault": record.kind,
        "submitted": len(ids),
        "completed_unique": counts["completed"],
        "lost": counts["lost"],
        "lost_ids": sorted(summary.lost(ids))[:20],
        "duplicates": counts["duplicate_ids"],
        "extra_executions": counts["extra_executions"],
        "unexpected_ids": counts["unexpected_ids"],
        "malformed_ledger_lines": counts["malformed_lines"],
        "failover_gap_s": round(gap[0], 3),
        "failover_gap_start_s": None if gap[1] is None else round(gap[1] - begin, 2),
        "longest_gap_whole_run_s": round(whole_run_gap[0], 3),
        "longest_gap_by_worker_s": {
            worker: round(longest_gap(times)[0], 3) for worker, times in sorted(by_worker.items())
        },
        "stall_by_worker_s": stall_by_worker,
        "scheduler_stall_s": scheduler_stall,
        "rejoin_s": record.rejoin_s,
        "down_s": None if fault_at is None or rejoin is None else round(rejoin - fault_at, 2),
        "throughput_per_s": {
            k: None if v is None else round(v, 2)
            for k, v in phase_throughput(first_finishes, begin, fault_at, rejoin, end).items()
        },
        "duration_s": round(end - begin, 2),
        "fault_detail": detail,
        "alerts": {**facts.prometheus, "fired": fired},
        "marks_s": {k: round(v - begin, 2) for k, v in sorted(marks.items(), key=lambda kv: kv[1])},
        "params": dict(params),
        "timings_s": {
            "cluster_boot": _between(marks, "begin", "cluster_ready"),
            "workers_ready": _between(marks, "cluster_ready", "workers_ready"),
            "publish": _between(marks, "publish", "published"),
        },
        "scheduler_exit": facts.scheduler_exit,
        "machine": dict(facts.machine),
        "date": facts.date,
        "leftovers": {k: list(v) for k, v in facts.leftovers.items()},
        "problems": list(facts.problems),
        "logs": facts.logs,
        "twin": dict(facts.twin),
    }
    title = (
        f"{record.kind}: {counts['completed']}/{len(ids)} completed, lost {counts['lost']}, "
        f"{counts['duplicate_ids']} duplicates, {gap_label} {gap[0]:.2f} s"
    )
    timeline = Timeline(
        first_finishes=first_finishes,
        all_finishes=all_finishes,
        begin=begin,
        end=max(end, rejoin or end) + 1,
        marks=record.marks(),
        gap=gap,
        title=title,
        gap_label=gap_label,
        alerts=[
            (
                _alert_label(a),
                a["severity"],
                begin + a["fired_s"],
                None if a["resolved_s"] is None else begin + a["resolved_s"],
            )
            for a in fired or []
        ],
    )
    return report, timeline


#: What repeated runs of one fault are compared by: report key -> its median.
REPEATED_KEYS = ("failover_gap_s", "scheduler_stall_s", "rejoin_s", "lost", "duplicates")
#: The same for the fault's own evidence (``fault_detail``), where the fault records it.
REPEATED_DETAIL_KEYS = (
    "all_peers_declared_down_s",
    "new_leader_s",
    "redelivered_s",
    "alarm_s",
    "blocked_s",
    "cleared_s",
)


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def summarize_runs(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``--repeat``: the runs' numbers side by side, each one's median (over the runs that
    measured it), the worst worker's stall per run, and the totals that must be zero."""
    if not reports:
        raise ValueError("summarize_runs needs at least one report")
    values: dict[str, list[float | None]] = {}
    for key in REPEATED_KEYS:
        values[key] = [r.get(key) for r in reports]
    for key in REPEATED_DETAIL_KEYS:
        found = [(r.get("fault_detail") or {}).get(key) for r in reports]
        if any(v is not None for v in found):
            values[key] = found
    values["worst_worker_stall_s"] = [
        max(stalls.values()) if (stalls := r.get("stall_by_worker_s")) else None for r in reports
    ]
    medians = {
        key: None if not (measured := [v for v in found if v is not None]) else _median(measured)
        for key, found in values.items()
    }
    return {
        "fault": reports[0].get("fault"),
        "runs": len(reports),
        "statuses": [r.get("status") for r in reports],
        "median": {k: None if v is None else round(v, 3) for k, v in medians.items()},
        "values": values,
        "lost_total": sum(int(r.get("lost") or 0) for r in reports),
        "submitted_total": sum(int(r.get("submitted") or 0) for r in reports),
        "params": reports[0].get("params"),
        "machine": reports[0].get("machine"),
        "date": reports[0].get("date"),
    }


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _mem_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_info(rabbitmq_version: str | None = None) -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "mem_total_gb": _mem_total_gb(),
        "python": platform.python_version(),
        "rabbitmq": rabbitmq_version,
        "celery": _version("celery"),
        "kombu": _version("kombu"),
    }


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


#: Bar colours of the alerts' rows, by severity.
SEVERITY_COLORS = {"critical": "#c44e52", "warning": "#dd8452"}


def plot_timeline(path: str | os.PathLike[str], timeline: Timeline) -> None:
    """Completions per second (unique, and re-executions on top), the fault,
    the restart and the rejoin marked, the gap (seconds, start) hatched; below, a row
    per alert that fired, a bar while it fired."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    begin, end, marks, title = timeline.begin, timeline.end, timeline.marks, timeline.title
    unique = completions_per_second(timeline.first_finishes, begin, end)
    every = completions_per_second(timeline.all_finishes, begin, end)
    again = [e - u for e, u in zip(every, unique, strict=True)]
    xs = list(range(len(unique)))
    rows = list(dict.fromkeys(label for label, *_ in timeline.alerts))
    if rows:
        fig, (ax, alert_ax) = plt.subplots(
            2,
            1,
            figsize=(13, 4.5 + 0.3 * len(rows)),
            dpi=100,
            sharex=True,
            gridspec_kw={"height_ratios": [4.5, 0.6 + 0.3 * len(rows)]},
        )
    else:
        fig, ax = plt.subplots(figsize=(13, 4.5), dpi=100)
    try:
        ax.bar(xs, unique, width=1.0, align="edge", color="#4c72b0", label="completed (first time)")
        if any(again):
            ax.bar(
                xs,
                again,
                bottom=unique,
                width=1.0,
                align="edge",
                color="#dd8452",
                label="completed again (duplicate)",
            )
        styles = {
            "fault": ("red", "-", "fault injected"),
            "restart": ("orange", "--", "restart begins"),
            "rejoin": ("green", "-", "back (rejoined / ready)"),
        }
        for key, (color, style, label) in styles.items():
            if key in marks:
                ax.axvline(marks[key] - begin, color=color, linestyle=style, lw=2, label=label)
        if "fault" in marks and "rejoin" in marks:
            ax.axvspan(marks["fault"] - begin, marks["rejoin"] - begin, color="red", alpha=0.07)
        seconds, start = timeline.gap
        if start is not None and seconds > 0:
            ax.axvspan(
                start - begin,
                start - begin + seconds,
                facecolor="none",
                edgecolor="black",
                hatch="//",
                lw=0,
                label=f"{timeline.gap_label} {seconds:.2f} s",
            )
        ax.set_xlim(0, len(unique))
        ax.set_ylabel("tasks completed per second")
        if rows:
            _plot_alerts(alert_ax, timeline, rows)
        else:
            ax.set_xlabel("seconds since publishing started")
        ax.set_title(title)
        ax.set_ylim(0, max([*every, 1]) * 1.1)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


def _plot_alerts(ax: Any, timeline: Timeline, rows: list[str]) -> None:
    """A row per alert (and label set), a bar from firing to resolved (or the end)."""
    begin, end = timeline.begin, timeline.end
    for label, severity, fired, resolved in timeline.alerts:
        row = rows.index(label)
        stop = end if resolved is None else resolved
        ax.broken_barh(
            [(fired - begin, max(stop - fired, 0.1))],
            (row - 0.35, 0.7),
            color=SEVERITY_COLORS.get(severity, "#8172b3"),
        )
    for key, color in (("fault", "red"), ("restart", "orange"), ("rejoin", "green")):
        if key in timeline.marks:
            ax.axvline(timeline.marks[key] - begin, color=color, lw=1, alpha=0.6)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize="small")
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since publishing started (bars: alert firing, Prometheus)")
    ax.grid(axis="x", alpha=0.3)
