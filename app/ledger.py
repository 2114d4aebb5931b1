"""Append-only execution ledger: proves that no task was lost, shows duplicates.

Every execution of a task appends one JSON line when it starts and one when it
finishes (``app.tasks.count`` does this when ``TASK_LEDGER`` is set).  Each line
is written with a single ``write()`` on a file opened with ``O_APPEND``, so
lines from many threads and processes never interleave or overwrite each other
(POSIX appends to a local file are atomic with respect to the file offset).

Reading a ledger gives per-task-id start/finish counts, the completed set, the
duplicates (task ids started more than once: at-least-once delivery made
visible) and completion timestamps; compare with the ids the publisher wrote
(``python -m app.scheduler --ids-file``) to count what was lost.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

START = "start"
FINISH = "finish"


def append_record(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one record as one line, atomically (one O_APPEND write)."""
    line = (json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, line)
        if written != len(line):  # pragma: no cover - only on a full disk etc.
            raise OSError(f"short write to ledger {path}: {written} of {len(line)} bytes")
    finally:
        os.close(fd)


@dataclass
class LedgerSummary:
    """What a ledger says happened, per task id."""

    starts: Counter[str] = field(default_factory=Counter)
    finishes: Counter[str] = field(default_factory=Counter)
    first_finish: dict[str, float] = field(default_factory=dict)
    workers: dict[str, list[str]] = field(default_factory=dict)
    malformed_lines: int = 0

    @property
    def completed(self) -> set[str]:
        return set(self.finishes)

    @property
    def duplicates(self) -> dict[str, int]:
        """Task ids that started more than once -> number of starts."""
        return {tid: n for tid, n in self.starts.items() if n > 1}

    @property
    def unfinished(self) -> set[str]:
        """Task ids that started but never finished (yet)."""
        return set(self.starts) - set(self.finishes)

    def completion_times(self) -> list[float]:
        """First-finish timestamps, sorted (for throughput curves)."""
        return sorted(self.first_finish.values())

    def lost(self, published: Iterable[str]) -> set[str]:
        """Published task ids that never completed."""
        return set(published) - self.completed

    def report(self, published: Iterable[str]) -> dict[str, int]:
        pub = set(published)
        completed = self.completed
        return {
            "published": len(pub),
            "completed": len(completed & pub),
            "lost": len(pub - completed),
            "duplicate_ids": len(self.duplicates),
            "extra_executions": sum(n - 1 for n in self.duplicates.values()),
            "unexpected_ids": len(set(self.starts) - pub),
            "malformed_lines": self.malformed_lines,
        }


def summarize(lines: Iterable[str]) -> LedgerSummary:
    summary = LedgerSummary()
    for raw in lines:
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            event = rec["event"]
            tid = rec["task_id"]
        except (ValueError, KeyError, TypeError):
            summary.malformed_lines += 1
            continue
        if event == START:
            summary.starts[tid] += 1
            summary.workers.setdefault(tid, []).append(str(rec.get("worker", "?")))
        elif event == FINISH:
            summary.finishes[tid] += 1
            ts = float(rec.get("ts", 0.0))
            if tid not in summary.first_finish or ts < summary.first_finish[tid]:
                summary.first_finish[tid] = ts
        else:
            summary.malformed_lines += 1
    return summary


def read_ledger(path: str | os.PathLike[str]) -> LedgerSummary:
    """Summarize a ledger file; a missing file is an empty ledger."""
    p = Path(path)
    if not p.exists():
        return LedgerSummary()
    with p.open(encoding="utf-8", errors="replace") as fh:
        return summarize(fh)


def read_ids(path: str | os.PathLike[str]) -> list[str]:
    """Task ids from an ids file (one per line, as the scheduler writes them)."""
    with Path(path).open(encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]
