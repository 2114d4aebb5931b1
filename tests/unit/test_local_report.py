"""localcluster.report and the CLI's argument parsing: pure, no processes."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest

from app.ledger import FINISH, START, append_record
from localcluster.report import (
    LedgerTail,
    completions_per_second,
    longest_gap,
    phase_throughput,
    plot_timeline,
    read_events,
    throughput,
)
from localcluster.run import DEFAULT_FAULT_AT, parse_args
from localcluster.sockets import connected_nodes


def record(path: Path, event: str, task_id: str, worker: str, ts: float) -> None:
    append_record(path, {"event": event, "task_id": task_id, "worker": worker, "ts": ts})


def test_longest_gap() -> None:
    assert longest_gap([]) == (0.0, None)
    assert longest_gap([5.0]) == (0.0, None)
    assert longest_gap([3.0, 1.0, 2.0, 7.5, 8.0]) == (4.5, 3.0)


def test_throughput_windows() -> None:
    times = [0.5, 1.5, 2.5, 3.5]
    assert throughput(times, 0.0, 2.0) == 1.0
    assert throughput(times, 2.0, 2.0) is None
    # Fault at 2, back at 3, last completion at 3.5 (counted).
    phases = phase_throughput(times, 0.0, 2.0, 3.0, 3.5)
    assert phases == pytest.approx({"before": 1.0, "during": 1.0, "after": 2.0})
    # Everything finished before the node was back: no "after" phase.
    assert phase_throughput(times, 0.0, 2.0, 10.0, 3.5)["after"] is None
    # No fault: one phase over the whole run.
    none = phase_throughput(times, 0.0, None, None, 3.5)
    assert none["during"] is None and none["after"] is None
    assert none["before"] == pytest.approx(4 / 3.5)


def test_completions_per_second() -> None:
    assert completions_per_second([10.1, 10.2, 12.9, 99.0], 10.0, 13.0) == [2, 0, 1]
    assert completions_per_second([], 0.0, 0.0) == [0]


def test_ledger_tail_reads_only_complete_lines(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    tail = LedgerTail(path)
    tail.poll()  # no file yet
    assert tail.completed() == 0
    record(path, START, "a", "w0@h", 1.0)
    record(path, START, "b", "w1@h", 1.1)
    tail.poll()
    assert tail.in_flight("w0@") == {"a"}
    record(path, FINISH, "a", "w0@h", 2.0)
    with path.open("a") as fh:  # a line still being written
        fh.write('{"event": "finish", "task_id": "b"')
    tail.poll()
    assert tail.completed() == 1
    assert tail.in_flight("w0@") == set()
    assert tail.in_flight("w1@") == {"b"}
    with path.open("a") as fh:
        fh.write(', "worker": "w1@h", "ts": 2.5}\n')
    tail.poll()
    assert tail.missing(["a", "b", "c"]) == {"c"}
    assert tail.rate(now=3.0, window=2.0) == 1.0
    assert [e.task_id for e in read_events(path)] == ["a", "b", "a", "b"]


def test_plot_timeline_writes_a_png(tmp_path: Path) -> None:
    out = tmp_path / "t.png"
    plot_timeline(
        out,
        first_finishes=[0.5, 1.5, 4.5],
        all_finishes=[0.5, 1.5, 1.6, 4.5],
        begin=0.0,
        end=6.0,
        marks={"fault": 1.0, "restart": 2.0, "rejoin": 3.0},
        gap=(3.0, 1.5),
        title="test",
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parse_args_defaults_and_validation(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse_args([])
    assert args.fault == "broker-kill"
    assert args.fault_at == DEFAULT_FAULT_AT
    assert args.out == "out/local"
    assert parse_args(["--fault-at", "0.5", "--fault", "none"]).fault_at == 0.5
    for bad in (["--fault", "meteor"], ["--tasks", "0"], ["--fault-at", "1"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    capsys.readouterr()


def test_connected_nodes_from_proc() -> None:
    """Which "node" this very process is connected to, read from /proc."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            assert connected_nodes(os.getpid(), [1, port]) == [1]
            assert connected_nodes(os.getpid(), [1]) == []
    assert connected_nodes(1 << 30, [port]) == []  # no such process


def test_report_is_json_serialisable_types() -> None:
    # The phases are plain floats or None (json.dumps in the CLI).
    phases = phase_throughput([1.0], 0.0, 0.5, 0.75, 1.0)
    json.dumps(phases)
    assert all(v is None or math.isfinite(v) for v in phases.values())
