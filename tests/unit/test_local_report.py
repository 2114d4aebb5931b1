"""localcluster.report and the CLI's argument parsing: pure, no processes."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest

from app.ledger import FINISH, START, append_record
from localcluster.faults import FAULTS, FaultRecord
from localcluster.prometheus import AlertInterval
from localcluster.report import (
    LedgerTail,
    RunFacts,
    Timeline,
    build_report,
    completions_per_second,
    longest_gap,
    phase_throughput,
    plot_timeline,
    read_events,
    summarize_runs,
    throughput,
)
from localcluster.run import DEFAULT_FAULT_AT, parse_args
from localcluster.sockets import established_endpoints


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
        Timeline(
            first_finishes=[0.5, 1.5, 4.5],
            all_finishes=[0.5, 1.5, 1.6, 4.5],
            begin=0.0,
            end=6.0,
            marks={"fault": 1.0, "restart": 2.0, "rejoin": 3.0},
            gap=(3.0, 1.5),
            title="test",
            gap_label="failover gap",
        ),
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parse_args_defaults_and_validation(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse_args([])
    assert args.fault == "broker-kill"
    assert args.fault_at == DEFAULT_FAULT_AT
    assert args.out == "out/local"
    assert parse_args(["--fault-at", "0.5", "--fault", "none"]).fault_at == 0.5
    assert {parse_args(["--fault", name]).fault for name in FAULTS} == set(FAULTS)
    for bad in (["--fault", "meteor"], ["--tasks", "0"], ["--fault-at", "1"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    capsys.readouterr()


def test_established_endpoints_from_proc() -> None:
    """Which peers this very process is connected to, read from /proc."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            assert established_endpoints(os.getpid())[("127.0.0.1", port)] == 1
    assert not established_endpoints(1 << 30)  # no such process


def test_report_is_json_serialisable_types() -> None:
    # The phases are plain floats or None (json.dumps in the CLI).
    phases = phase_throughput([1.0], 0.0, 0.5, 0.75, 1.0)
    json.dumps(phases)
    assert all(v is None or math.isfinite(v) for v in phases.values())


def line(event: str, task_id: str, worker: str, ts: float) -> str:
    return json.dumps({"event": event, "task_id": task_id, "worker": worker, "ts": ts})


def facts(record: FaultRecord, lines: list[str], **changes: object) -> RunFacts:
    base = RunFacts(
        status="ok",
        problems=[],
        params={"tasks": 3},
        ids=["a", "b", "c"],
        ledger_lines=lines,
        fault=record,
        marks={"begin": 90.0, "cluster_ready": 95.0, "publish": 100.0, "published": 101.0},
        scheduler_exit=0,
        timed_out=False,
        machine={"cpus": 2},
        date="2026-12-01T00:00:00+00:00",
        twin={"stack": "prod"},
        leftovers={},
        logs="out/local/logs",
    )
    return RunFacts(**{**base.__dict__, **changes})


def test_the_report_of_a_broker_kill_counts_losses_duplicates_gaps_and_the_fault() -> None:
    # a ran on w0 and finished; b started on w0 (in flight at the fault), was redelivered
    # to w1 and finished there, then w0's copy finished too; c was never run: lost.
    lines = [
        line(START, "a", "celery@w0", 101.0),
        line(FINISH, "a", "celery@w0", 102.0),
        line(START, "b", "celery@w0", 103.0),
        line(START, "b", "celery@w1", 107.0),
        line(FINISH, "b", "celery@w1", 108.0),
        line(FINISH, "b", "celery@w0", 108.5),
        "not json",
    ]
    record = FaultRecord(
        "broker-kill",
        target="rabbitmq-server-1",
        found_by="its AMQP connection",
        at_completed=1,
        injected=104.0,
        restarted=105.0,
        back=110.0,
        in_flight_ids=["b"],
        detail={"node": 1, "stop_s": 0.1},
    )
    # The scheduler confirmed 1, then 2 before the fault, then nothing until 109.
    confirms = [(100.5, 1), (103.5, 2), (109.0, 3)]
    report, timeline = build_report(facts(record, lines, confirms=confirms))
    assert report["submitted"] == 3 and report["completed_unique"] == 2
    assert report["scheduler_stall_s"] == 5.0  # from the fault (104) to 109
    # Each worker's own stall from the fault on: w0 104 -> 108.5, w1 104 -> 108.
    assert report["stall_by_worker_s"] == {"celery@w0": 4.5, "celery@w1": 4.0}
    assert report["lost"] == 1 and report["lost_ids"] == ["c"]
    assert report["duplicates"] == 1 and report["extra_executions"] == 1
    assert report["malformed_ledger_lines"] == 1
    # From the fault (104) to the next completion (108): the failover's gap.
    assert report["failover_gap_s"] == 4.0
    assert report["failover_gap_start_s"] == 4.0  # seconds after publishing began
    assert report["longest_gap_whole_run_s"] == 6.0
    # Per worker pod (they all are celery@<pod>): w0 finished at 102 and 108.5.
    assert report["longest_gap_by_worker_s"] == {"celery@w0": 6.5, "celery@w1": 0.0}
    assert report["rejoin_s"] == 5.0 and report["down_s"] == 6.0
    assert report["duration_s"] == 8.5
    assert report["fault_detail"] == {
        "kind": "broker-kill",
        "target": "rabbitmq-server-1",
        "found_by": "its AMQP connection",
        "at_completed": 1,
        "node": 1,
        "stop_s": 0.1,
        "rejoin_s": 5.0,
        "in_flight": 1,
        "in_flight_redelivered": 1,
        "in_flight_completed": 1,
    }
    assert report["marks_s"]["fault"] == 4.0 and report["marks_s"]["rejoin"] == 10.0
    assert report["timings_s"] == {"cluster_boot": 5.0, "workers_ready": None, "publish": 1.0}
    json.dumps(report)
    assert timeline.gap == (4.0, 104.0) and timeline.gap_label == "failover gap"
    assert timeline.marks == {"fault": 104.0, "restart": 105.0, "rejoin": 110.0}
    assert timeline.first_finishes == [102.0, 108.0]
    assert "lost 1" in timeline.title


def test_the_report_of_a_run_without_a_fault_or_that_timed_out() -> None:
    lines = [line(FINISH, t, "celery@w0", 100.0 + i) for i, t in enumerate("abc")]
    report, timeline = build_report(facts(FaultRecord("none"), lines))
    assert report["lost"] == 0 and report["down_s"] is None and report["rejoin_s"] is None
    assert report["fault_detail"] == {"kind": "none"}
    assert report["stall_by_worker_s"] is None and report["scheduler_stall_s"] is None
    assert report["failover_gap_s"] == report["longest_gap_whole_run_s"] == 1.0
    assert timeline.gap_label == "longest gap" and timeline.marks == {}
    timed_out, _ = build_report(facts(FaultRecord("none"), lines[:1], timed_out=True))
    assert timed_out["fault_detail"]["timed_out"] is True and timed_out["lost"] == 2


def test_the_ledger_tail_says_when_a_lost_workers_tasks_started_elsewhere(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    record(path, START, "a", "celery@w0", 1.0)
    record(path, START, "b", "celery@w0", 1.5)
    record(path, START, "a", "celery@w1", 7.0)  # redelivered after w0 was lost at 2.0
    tail = LedgerTail(path)
    assert tail.redelivered_after(["a", "b"], "celery@w0", 2.0) is None  # b not yet
    assert not tail.restarted_elsewhere(["a", "b"], "celery@w0")
    record(path, START, "b", "celery@w2", 9.5)
    assert tail.redelivered_after(["a", "b"], "celery@w0", 2.0) == 7.5
    assert tail.restarted_elsewhere(["a", "b"], "celery@w0")
    assert tail.redelivered_after([], "celery@w0", 2.0) is None


def test_a_dead_workers_task_finished_elsewhere_is_not_in_flight(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    record(path, START, "a", "celery@w0", 1.0)  # w0 dies with "a" running
    record(path, START, "b", "celery@w1", 1.5)
    tail = LedgerTail(path)
    tail.poll()
    assert tail.in_flight("") == {"a", "b"}
    record(path, START, "a", "celery@w2", 5.0)
    record(path, FINISH, "a", "celery@w2", 6.0)  # redelivered and done elsewhere
    tail.poll()
    assert tail.in_flight("") == {"b"} and tail.in_flight("celery@w0") == set()


def test_repeated_runs_are_summarised_by_their_medians() -> None:
    def report(gap: float, scheduler: float | None, lost: int, down: float | None) -> dict:
        return {
            "fault": "machine-loss",
            "status": "ok",
            "submitted": 100,
            "lost": lost,
            "duplicates": 2,
            "failover_gap_s": gap,
            "scheduler_stall_s": scheduler,
            "rejoin_s": 20.0,
            "stall_by_worker_s": {"w0": gap, "w1": gap + 1.0},
            "fault_detail": {"all_peers_declared_down_s": down},
        }

    summary = summarize_runs(
        [report(9.0, 7.0, 0, 9.5), report(12.5, None, 1, None), report(8.0, 9.0, 0, 9.1)]
    )
    assert summary["runs"] == 3 and summary["fault"] == "machine-loss"
    assert summary["median"]["failover_gap_s"] == 9.0
    # A number a run did not measure is left out of its median, not counted as zero.
    assert summary["median"]["scheduler_stall_s"] == 8.0
    assert summary["median"]["all_peers_declared_down_s"] == 9.3
    assert summary["values"]["scheduler_stall_s"] == [7.0, None, 9.0]
    assert summary["median"]["worst_worker_stall_s"] == 10.0
    assert summary["lost_total"] == 1 and summary["submitted_total"] == 300
    # Evidence no run recorded is not in the summary at all.
    assert "alarm_s" not in summary["values"]
    with pytest.raises(ValueError, match="at least one report"):
        summarize_runs([])
    json.dumps(summary)


def test_repeat_is_a_positive_count(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args([]).repeat == 1
    assert parse_args(["--repeat", "3"]).repeat == 3
    with pytest.raises(SystemExit):
        parse_args(["--repeat", "0"])
    assert "--repeat" in capsys.readouterr().err


def test_down_seconds_is_one_value_or_a_sweep(capsys: pytest.CaptureFixture[str]) -> None:
    one = parse_args(["--fault", "broker-pause", "--down-seconds", "4"])
    assert one.down_seconds == 4.0 and one.down_seconds_list == [4.0]
    sweep = parse_args(["--fault", "worker-pause", "--down-seconds", "2,4.5,6"])
    assert sweep.down_seconds == 2.0 and sweep.down_seconds_list == [2.0, 4.5, 6.0]
    assert parse_args(["--fault", "machine-loss"]).down_seconds_list == [60.0]
    for bad in ("2,-1", "2,,4", "soon"):
        with pytest.raises(SystemExit):
            parse_args(["--down-seconds", bad])
        assert "non-negative numbers separated by commas" in capsys.readouterr().err


def test_the_report_lists_the_alerts_that_fired_around_the_fault(tmp_path: Path) -> None:
    lines = [line(FINISH, t, "celery@w0", 101.0 + i) for i, t in enumerate("abc")]
    record = FaultRecord("broker-kill", injected=104.0, restarted=105.0, back=125.0)
    alerts = [
        # The boot's (before publishing began at 100): not this batch's.
        AlertInterval("RabbitMQNodeDown", "critical", {}, 92.0, 95.0),
        AlertInterval("RabbitMQNodeDown", "critical", {}, 107.0, 112.5),
        AlertInterval("RabbitMQNodeNotClustered", "critical", {"pod": "p0"}, 106.5, 111.0),
        AlertInterval("CeleryNoConsumer", "critical", {}, 126.0, None),  # firing at the end
    ]
    info = {"prometheus": "2.42.0+ds-5+deb12u1", "node_down_for_s": 2}
    report, timeline = build_report(facts(record, lines, alerts=alerts, prometheus=info))
    section = report["alerts"]
    assert section["prometheus"] == "2.42.0+ds-5+deb12u1" and section["node_down_for_s"] == 2
    fired = section["fired"]
    assert [(a["alert"], a["labels"]) for a in fired] == [
        ("RabbitMQNodeNotClustered", {"pod": "p0"}),
        ("RabbitMQNodeDown", {}),
        ("CeleryNoConsumer", {}),
    ]
    down = fired[1]
    assert down["fired_after_fault_s"] == 3.0 and down["firing_s"] == 5.5
    assert down["resolved_after_restart_s"] == 7.5 and down["resolved_after_back_s"] == -12.5
    assert down["fired_s"] == 7.0 and down["resolved_s"] == 12.5
    still = fired[2]
    assert still["resolved_after_restart_s"] is None and still["firing_s"] is None
    json.dumps(report)
    assert timeline.alerts[0] == ("RabbitMQNodeNotClustered{pod=p0}", "critical", 106.5, 111.0)
    assert timeline.alerts[2][3] is None
    out = tmp_path / "t.png"
    plot_timeline(out, timeline)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # No Prometheus (or unreadable): no list, not an empty one.
    report, timeline = build_report(facts(record, lines))
    assert report["alerts"] == {"fired": None} and timeline.alerts == []
    # A run without a fault: nothing to be relative to.
    report, _ = build_report(facts(FaultRecord("none"), lines, alerts=alerts[1:2]))
    assert report["alerts"]["fired"][0]["fired_after_fault_s"] is None
