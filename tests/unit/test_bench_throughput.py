"""make bench's throughput numbers without a broker (issue #13): where a sleeping
workload's time goes against its slot limit, the scaling curve's points, CPU per 1,000
tasks, the goals, and the slot layouts the bench accepts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from bench import run
from bench.results import (
    build_results,
    check_goals,
    format_table,
    per_1000,
    plot_results,
    scaling_summary,
    slot_usage,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_a_perfect_drain_is_its_ideal_and_nothing_else() -> None:
    # 2 slots, 4 tasks of 1 s, back to back from the publish at t=10.
    usage = slot_usage(10.0, [10, 10, 11, 11], [11, 11, 12, 12], slots=2, task_seconds=1.0)
    assert usage["ideal_s"] == usage["drain_s"] == 2.0
    assert usage["over_ideal"] == 0.0
    for part in ("ramp_s", "steady_s", "tail_s", "overrun_s"):
        assert usage[part] == 0.0, part
    assert usage["all_slots_busy_after_s"] == 0.0


def test_the_time_beyond_the_ideal_is_split_by_cause_and_adds_up() -> None:
    # 2 slots, 5 tasks of 1 s: the first starts 0.5 s after the publish (ramp), the
    # second slot's next task waits 0.1 s (steady), one task runs 0.2 s long (overrun),
    # the last wave has one task for two slots (tail).
    starts = [0.5, 0.6, 1.5, 1.7, 2.5]
    finishes = [1.5, 1.6, 2.5, 2.9, 3.5]
    usage = slot_usage(0.0, starts, finishes, slots=2, task_seconds=1.0)
    assert usage["ideal_s"] == 2.5 and usage["drain_s"] == 3.5
    parts = usage["ramp_s"] + usage["steady_s"] + usage["overrun_s"] + usage["tail_s"]
    assert parts == pytest.approx(usage["drain_s"] - usage["ideal_s"])
    assert usage["ramp_s"] == pytest.approx((0.5 * 2 + 0.1) / 2)
    assert usage["steady_s"] == pytest.approx(0.1 / 2)
    assert usage["overrun_s"] == pytest.approx(0.2 / 2)
    assert usage["tail_s"] == pytest.approx(0.6 / 2)  # one slot idle from 2.9 to 3.5
    assert usage["steady_gap_ms"] == pytest.approx(0.1 / 3 * 1000)  # 3 tasks after all busy
    assert usage["over_ideal"] == pytest.approx(0.4)


def test_slot_usage_refuses_unpaired_events() -> None:
    with pytest.raises(ValueError, match="as many starts as finishes, got 2/1"):
        slot_usage(0.0, [1.0, 2.0], [3.0], slots=1, task_seconds=1.0)


def test_cpu_per_1000_tasks() -> None:
    assert per_1000(2.5, 5000) == 0.5
    assert per_1000(None, 10) is None and per_1000(1.0, 0) is None


def _point(nodes: int, slots: int, rate: float) -> dict[str, Any]:
    return {
        "nodes": nodes,
        "slots": slots,
        "pods": min(3, slots),
        "concurrency": max(1, slots // 3),
        "tasks": 2000,
        "rate": rate,
        "broker_cpu_per_1000": 0.8,
        "worker_cpu_per_1000": 1.2,
    }


def test_scaling_points_of_every_run_are_grouped_by_nodes_and_slots() -> None:
    runs = [
        {"scaling": [_point(3, 1, 100), _point(3, 96, 700), _point(1, 96, 900)]},
        {"scaling": [_point(3, 1, 120), _point(3, 96, 650), _point(1, 96, 950)]},
        {"scaling": [_point(3, 1, 110), _point(3, 96, 600), _point(1, 96, 1000)]},
    ]
    summary = scaling_summary(runs)
    assert [(p["nodes"], p["slots"]) for p in summary] == [(1, 96), (3, 1), (3, 96)]
    one = summary[1]
    assert (one["rate"]["median"], one["rate"]["min"], one["rate"]["max"]) == (110, 100, 120)
    assert one["rate"]["n"] == 3 and one["pods"] == 1 and one["concurrency"] == 1


def _side(publish: float, over: float) -> dict[str, Any]:
    return {"summary": {"publish_rate": {"median": publish}, "sleep_over_ideal": {"median": over}}}


def test_goals_are_checked_on_the_medians() -> None:
    met = check_goals({"article": _side(1000, 4.0), "ours": _side(1600, 0.05)})
    assert met["publish_ours_over_article"] == 1.6 and met["publish_goal_met"] is True
    assert met["sleep_goal_met"] is True
    missed = check_goals({"article": _side(1000, 0.0), "ours": _side(1400, 0.12)})
    assert missed["publish_goal_met"] is False and missed["sleep_goal_met"] is False
    unknown = check_goals({"article": _side(0, 0.0), "ours": _side(1400, None)})  # type: ignore[arg-type]
    assert unknown["publish_goal_met"] is None and unknown["sleep_goal_met"] is None


def _full_run(publish: float, scaling_rate: float) -> dict[str, Any]:
    usage = slot_usage(0.0, [0.1, 0.1, 1.2], [1.1, 1.1, 2.2], slots=2, task_seconds=1.0)
    return {
        "publish_rate": publish,
        "publish_rate_confirms_toggled": publish / 2,
        "drain_rate": 500.0,
        "sleep_drain_s": usage["drain_s"],
        "sleep_ideal_s": usage["ideal_s"],
        "sleep_over_ideal": usage["over_ideal"],
        "failover_lost": 0,
        "failover_duplicates": 0,
        "failover_gap_s": 0.3,
        "failover": {"published": 600},
        "publish_broker_cpu_per_1000": 0.6,
        "publish_client_cpu_per_1000": 0.3,
        "drain_broker_cpu_per_1000": 0.9,
        "drain_worker_cpu_per_1000": 1.4,
        "sleep": {**usage, "pool": "threads", "concurrency_per_worker": 1},
        "scaling": [_point(3, 1, scaling_rate), _point(3, 3, 2 * scaling_rate), _point(1, 3, 99)],
    }


def test_table_and_plot_carry_the_scaling_curve_cpu_and_goals(tmp_path: Path) -> None:
    results = build_results(
        args=argparse.Namespace(runs=2, out="x", verbose=False),
        argv=[],
        status="ok",
        problems=[],
        configs={},
        runs={
            "article": [_full_run(1000, 80), _full_run(1100, 90)],
            "ours": [_full_run(1700, 150), _full_run(1800, 160)],
        },
        checks={},
        timings={},
        rabbitmq_versions={},
        twins={"ours-1node": {"run_id": "cccccc"}},
        bench_adaptations={},
    )
    json.dumps(results)  # results.json must serialize
    assert results["configs"]["ours"]["single_node_twin"] == {"run_id": "cccccc"}
    assert results["goals"]["publish_ours_over_article"] == pytest.approx(1750 / 1050)
    cpu = results["configs"]["ours"]["summary"]["drain_worker_cpu_per_1000"]
    assert cpu["median"] == 1.4
    table = format_table(results)
    assert "| 3 RabbitMQ nodes, 1 slot | 85 (80-90) · 0.80, 1.20 | 155 (150-160)" in table
    assert "| 1 RabbitMQ node, 3 slots |" in table
    assert "CPU s / 1,000 tasks: workers, draining | 1.40 s" in table
    assert "(>= 1.5x: met)" in table and "(<= 10 %: NOT met)" in table
    assert (
        "sleeping workload, ours: 3 tasks, beyond the ideal: ramp 0.10 s, steady 0.10 s, "
        "overrun 0.00 s, tail 0.50 s; a slot idles 200.0 ms between tasks"
    ) in table
    png = tmp_path / "bench.png"
    plot_results(png, results)
    assert png.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    ("slots", "layout"), [(1, (1, 1)), (2, (2, 1)), (3, (3, 1)), (6, (3, 2)), (96, (3, 32))]
)
def test_slots_are_laid_out_over_the_deployments_three_pods(
    slots: int, layout: tuple[int, int]
) -> None:
    assert run.slot_layout(slots) == layout


def test_slot_counts_that_do_not_divide_over_the_pods_are_refused_by_option() -> None:
    assert run.slot_counts("96,1,3") == [1, 3, 96]
    with pytest.raises(argparse.ArgumentTypeError, match="--scaling-slots: 4 slots do not"):
        run.slot_counts("1,4")
    with pytest.raises(argparse.ArgumentTypeError, match="not integers: '1,x'"):
        run.slot_counts("1,x")
    with pytest.raises(argparse.ArgumentTypeError, match="0 is not a positive"):
        run.slot_counts("0")
