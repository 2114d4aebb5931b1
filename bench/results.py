"""The benchmark's numbers: medians and spread, ``results.json``, the table, ``bench.png``.

Pure functions over the per-run values :mod:`bench.run` collects, plus the plot
(matplotlib, Agg backend: no display needed).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from localcluster.report import machine_info, utc_now

CONFIG_KEYS = ("article", "ours")
CONFIG_LABELS = {"article": "article", "ours": "ours"}
COLORS = {"article": "#dd8452", "ours": "#4c72b0"}


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    digits: int


METRICS = (
    Metric("publish_rate", "publish rate (1 producer, no consumer)", "tasks/s", True, 0),
    Metric(
        "publish_rate_confirms_toggled",
        "publish rate, confirms switched (article: on, ours: off)",
        "tasks/s",
        True,
        0,
    ),
    Metric("drain_rate", "drain rate (3 workers, no-op tasks)", "tasks/s", True, 0),
    Metric("sleep_drain_s", "sleeping workload: drain time", "s", False, 1),
    Metric("failover_lost", "node SIGKILL: tasks lost", "tasks", False, 0),
    Metric("failover_duplicates", "node SIGKILL: ran twice", "tasks", False, 0),
    Metric("failover_gap_s", "node SIGKILL: failover gap", "s", False, 2),
)
#: Also per run, in the table and the CPU panel: CPU seconds per 1,000 tasks.
CPU_METRICS = (
    Metric("publish_broker_cpu_per_1000", "CPU s / 1,000 tasks: broker, publishing", "s", False, 2),
    Metric("publish_client_cpu_per_1000", "CPU s / 1,000 tasks: publisher", "s", False, 2),
    Metric("drain_broker_cpu_per_1000", "CPU s / 1,000 tasks: broker, draining", "s", False, 2),
    Metric("drain_worker_cpu_per_1000", "CPU s / 1,000 tasks: workers, draining", "s", False, 2),
)
#: The goals of issue #13, checked on every run's medians.
PUBLISH_GOAL = 1.5  # ours (confirmed) / article (unconfirmed)
SLEEP_GOAL = 0.10  # ours' sleeping workload at most 10 % over its slot limit
#: Not plotted as a bar of its own: drawn as the ideal line over the drain time.
IDEAL_KEY = "sleep_ideal_s"
_IDEAL = Metric(IDEAL_KEY, "sleeping workload: ideal (tasks x seconds / slots)", "s", False, 1)
_OVER_IDEAL = Metric("sleep_over_ideal", "sleeping workload: over its ideal", "", False, 3)


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Per-run values, their median, min and max (runs without a value skipped)."""
    present = [float(v) for v in values if v is not None]
    return {
        "values": list(values),
        "median": statistics.median(present) if present else None,
        "min": min(present) if present else None,
        "max": max(present) if present else None,
        "n": len(present),
        "total": sum(present) if present else None,
    }


def per_1000(cpu_s: float | None, tasks: int) -> float | None:
    """CPU seconds per 1,000 tasks."""
    return None if cpu_s is None or tasks <= 0 else cpu_s / tasks * 1000


def slot_usage(
    first_publish: float,
    starts: Sequence[float],
    finishes: Sequence[float],
    slots: int,
    task_seconds: float,
) -> dict[str, Any]:
    """Where a drain's time went, against its slot limit ``tasks x task_seconds / slots``.

    ``slots x drain`` slot-seconds = the tasks' own time + idle slots, so the drain
    exceeds the ideal by exactly: ``overrun_s`` (tasks ran longer than their sleeps:
    ledger writes, oversleeping), ``ramp_s`` (idle slots from the first publish until
    every slot was first busy: publishing, first deliveries), ``steady_s`` (idle slots
    between tasks once all were busy, until the last task started: the ack and the
    next delivery, prefetch 1 on a quorum queue) and ``tail_s`` (idle slots once the
    last task started: the last wave has fewer tasks than slots). Each is idle
    slot-seconds / slots: seconds of drain.
    """
    n = len(starts)
    if n == 0 or len(finishes) != n or slots < 1:
        raise ValueError(f"slot_usage needs as many starts as finishes, got {n}/{len(finishes)}")
    end = max(finishes)
    last_start = max(starts)
    events = sorted([(t, 1) for t in starts] + [(t, -1) for t in finishes])
    busy, now, full_at = 0, first_publish, None
    idle = {"ramp": 0.0, "steady": 0.0, "tail": 0.0}
    for t, change in events:
        t = max(t, first_publish)
        phase = "tail" if now >= last_start else ("ramp" if full_at is None else "steady")
        idle[phase] += max(0, slots - busy) * (t - now)
        now = t
        busy += change
        if full_at is None and busy >= slots:
            full_at = t
    work = sum(f - s for s, f in zip(starts, finishes, strict=True))
    drain = end - first_publish
    ideal = n * task_seconds / slots
    steady_started = sum(1 for t in starts if full_at is not None and t > full_at)
    return {
        "tasks": n,
        "slots": slots,
        "task_seconds": task_seconds,
        "ideal_s": ideal,
        "drain_s": drain,
        "over_ideal": drain / ideal - 1 if ideal > 0 else None,
        "mean_task_s": work / n,
        "all_slots_busy_after_s": None if full_at is None else full_at - first_publish,
        "overrun_s": (work - n * task_seconds) / slots,
        "ramp_s": idle["ramp"] / slots,
        "steady_s": idle["steady"] / slots,
        "tail_s": idle["tail"] / slots,
        # Per task started once every slot was busy: a slot's idle time between tasks.
        "steady_gap_ms": idle["steady"] / steady_started * 1000 if steady_started else None,
    }


def check_goals(per_config: dict[str, Any]) -> dict[str, Any]:
    """Issue #13's goals on the medians: ours publishes (every task confirmed) at
    >= 1.5x the article's unconfirmed rate; ours' sleeping workload drains within 10 %
    of its slot limit."""
    a = per_config["article"]["summary"]["publish_rate"]["median"]
    o = per_config["ours"]["summary"]["publish_rate"]["median"]
    over = per_config["ours"]["summary"]["sleep_over_ideal"]["median"]
    ratio = None if not a or o is None else o / a
    return {
        "publish_ours_over_article": ratio,
        "publish_goal": PUBLISH_GOAL,
        "publish_goal_met": None if ratio is None else ratio >= PUBLISH_GOAL,
        "sleep_ours_over_ideal": over,
        "sleep_goal": SLEEP_GOAL,
        "sleep_goal_met": None if over is None else over <= SLEEP_GOAL,
    }


def scaling_summary(config_runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The scaling points of every run, grouped by (nodes, slots): the spread of each
    point's drain rate and CPU seconds per 1,000 tasks, in slot order."""
    grouped: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for run in config_runs:
        for point in run.get("scaling", []):
            grouped.setdefault((point["nodes"], point["slots"]), []).append(point)
    summary = []
    for (nodes, slots), points in sorted(grouped.items()):
        first = points[0]
        summary.append(
            {
                "nodes": nodes,
                "slots": slots,
                "pods": first["pods"],
                "concurrency": first["concurrency"],
                "tasks": first["tasks"],
                **{
                    key: spread([p.get(key) for p in points])
                    for key in ("rate", "broker_cpu_per_1000", "worker_cpu_per_1000")
                },
            }
        )
    return summary


def _per_side(values: dict[str, str | None]) -> str | None:
    """``"3.10.8 (article), 4.3.6 (ours)"``: one line for the table and the plot."""
    known = [f"{values[k]} ({k})" for k in CONFIG_KEYS if values.get(k)]
    return ", ".join(known) or None


def build_results(
    *,
    args: argparse.Namespace,
    argv: Sequence[str],
    status: str,
    problems: list[str],
    configs: dict[str, dict[str, Any]],
    runs: dict[str, list[dict[str, Any]]],
    checks: dict[str, Any],
    timings: dict[str, float],
    rabbitmq_versions: dict[str, str],
    twins: dict[str, dict[str, Any]],
    bench_adaptations: dict[str, str],
) -> dict[str, Any]:
    """Everything ``results.json`` holds, from what a bench collected (no I/O but the
    machine's description). ``rabbitmq_versions``: what ``rabbitmqctl version`` printed
    in each side's pods; ``twins``: each side's twin (stack, run id, image, root,
    Erlang, adaptations, boot times, what its close left)."""
    params = {k: v for k, v in vars(args).items() if k not in ("out", "verbose")}
    per_config: dict[str, Any] = {}
    for key in CONFIG_KEYS:
        config_runs = runs.get(key, [])
        summary = {
            m.key: spread([r.get(m.key) for r in config_runs])
            for m in (*METRICS, *CPU_METRICS, _IDEAL, _OVER_IDEAL)
        }
        per_config[key] = {
            "settings": configs.get(key, {}),
            "rabbitmq": rabbitmq_versions.get(key),
            "twin": twins.get(key),
            "single_node_twin": twins.get(f"{key}-1node"),  # the scaling curve's 1-node cluster
            "queue_check": checks.get(key),
            "summary": summary,
            "scaling": scaling_summary(config_runs),
            "runs": config_runs,
        }
    comparison = {}
    for m in METRICS:
        a = per_config["article"]["summary"][m.key]["median"]
        o = per_config["ours"]["summary"][m.key]["median"]
        comparison[m.key] = {
            "ours_minus_article": None if a is None or o is None else o - a,
            "ours_over_article": None if not a or o is None else o / a,
        }
    machine = machine_info(_per_side(dict(rabbitmq_versions)))
    machine["erlang"] = _per_side({k: (t or {}).get("erlang") for k, t in twins.items()})
    return {
        "status": status,
        "problems": problems,
        "date": utc_now(),
        "command": " ".join(["python -m bench", shlex.join(argv)]).strip(),
        "machine": machine,
        "params": params,
        "timings_s": timings,
        "bench_adaptations": bench_adaptations,
        "metrics": [
            {"key": m.key, "label": m.label, "unit": m.unit, "higher_is_better": m.higher_is_better}
            for m in (*METRICS, *CPU_METRICS, _IDEAL, _OVER_IDEAL)
        ],
        "configs": per_config,
        "comparison": comparison,
        "goals": check_goals(per_config),
    }


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _cell(stats: dict[str, Any], m: Metric, published: int = 0) -> str:
    if stats["median"] is None:
        return "-"
    unit = "" if m.unit == "tasks" else f" {m.unit}"
    text = f"{_num(stats['median'], m.digits)}{unit}"
    if stats["n"] > 1:
        text += f" ({_num(stats['min'], m.digits)}-{_num(stats['max'], m.digits)})"
    if m.unit == "tasks" and stats["n"] > 1:
        # A median of 0 would hide a run that lost tasks: the total says it.
        text += f"; total {_num(stats['total'], 0)} of {published:,}"
    return text


def failover_published(config: dict[str, Any]) -> int:
    """Tasks published during the node kills, over every run."""
    return sum(int(r.get("failover", {}).get("published", 0)) for r in config["runs"])


def _versus(m: Metric, a: float | None, o: float | None) -> str:
    if a is None or o is None:
        return "-"
    if m.unit in ("tasks/s", "s") and a > 0:
        change = (o - a) / a * 100
        return f"{o / a:.2f}x ({change:+.0f} %)"
    diff = o - a
    return f"{diff:+,.{m.digits}f} in total" if diff else "same"


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table: median (min-max) per configuration, and ours against the article."""
    configs = results["configs"]
    lines = [
        "| metric | article (ha-all classic, Celery defaults) | ours (quorum, app/settings.py) "
        "| ours vs article |",
        "|---|---|---|---|",
    ]
    for m in METRICS:
        a = configs["article"]["summary"][m.key]
        o = configs["ours"]["summary"][m.key]
        if m.key == "publish_rate_confirms_toggled":  # not like for like
            versus = "(see publish rate)"
        elif m.unit == "tasks":  # counts: compare the totals over all runs
            versus = _versus(m, a["total"], o["total"])
        else:
            versus = _versus(m, a["median"], o["median"])
        cells = [
            _cell(configs[k]["summary"][m.key], m, failover_published(configs[k]))
            for k in CONFIG_KEYS
        ]
        lines.append(f"| {m.label} | {cells[0]} | {cells[1]} | {versus} |")
        if m.key == "sleep_drain_s":
            ideal = [_ideal_text(configs[k]) for k in CONFIG_KEYS]
            lines.append(f"| sleeping workload: ideal | {ideal[0]} | {ideal[1]} | |")
    for m in CPU_METRICS:
        a, o = (configs[k]["summary"][m.key] for k in CONFIG_KEYS)
        cells = [_cell(configs[k]["summary"][m.key], m) for k in CONFIG_KEYS]
        lines.append(
            f"| {m.label} | {cells[0]} | {cells[1]} | {_versus(m, a['median'], o['median'])} |"
        )
    lines += ["", *sleep_breakdown_lines(configs), *scaling_lines(configs), *goal_lines(results)]
    params = results["params"]
    machine = results["machine"]
    lines.append("")
    lines.append(
        f"{results['date']} · {machine.get('cpus')} CPUs ({machine.get('cpu_model')}), "
        f"{machine.get('mem_total_gb')} GiB · RabbitMQ {machine.get('rabbitmq')}, Erlang "
        f"{machine.get('erlang')}, Celery {machine.get('celery')}, Python {machine.get('python')} "
        f"· {params.get('runs')} runs · status {results['status']}"
    )
    lines.append(f"command: {results['command']}")
    return "\n".join(lines)


#: slot_usage's parts of a drain beyond its ideal, in the order they happen.
SLEEP_PARTS = ("ramp_s", "steady_s", "overrun_s", "tail_s")


def _median_of(runs: Sequence[dict[str, Any]], section: str, key: str) -> float | None:
    values = [r[section][key] for r in runs if r.get(section, {}).get(key) is not None]
    return statistics.median(values) if values else None


def sleep_breakdown_lines(configs: dict[str, Any]) -> list[str]:
    """Per side: the sleeping workload's time beyond its ideal, by cause (medians)."""
    lines = []
    for key in CONFIG_KEYS:
        runs = configs[key]["runs"]
        if not runs or "sleep" not in runs[0] or "ramp_s" not in runs[0]["sleep"]:
            continue
        parts = ", ".join(
            f"{part[:-2]} {_num(_median_of(runs, 'sleep', part), 2)} s" for part in SLEEP_PARTS
        )
        gap = _median_of(runs, "sleep", "steady_gap_ms")
        lines.append(
            f"sleeping workload, {key}: {runs[0]['sleep']['tasks']:,} tasks, beyond the ideal: "
            f"{parts}; a slot idles {_num(gap, 1)} ms between tasks"
        )
    return lines


def scaling_lines(configs: dict[str, Any]) -> list[str]:
    """A second table: drain rate of no-op tasks against worker slots and nodes."""
    points = sorted(
        {(p["nodes"], p["slots"]) for k in CONFIG_KEYS for p in configs[k]["scaling"]},
        key=lambda point: (-point[0], point[1]),  # 3 nodes first, then 1
    )
    if not points:
        return []
    lines = [
        "",
        "| drain, no-op tasks | article: tasks/s · CPU s/1,000 broker, workers "
        "| ours: tasks/s · CPU s/1,000 broker, workers |",
        "|---|---|---|",
    ]
    for nodes, slots in points:
        cells = []
        for key in CONFIG_KEYS:
            found = [
                p for p in configs[key]["scaling"] if (p["nodes"], p["slots"]) == (nodes, slots)
            ]
            if not found:
                cells.append("-")
                continue
            p = found[0]
            cells.append(
                f"{_num(p['rate']['median'], 0)} ({_num(p['rate']['min'], 0)}-"
                f"{_num(p['rate']['max'], 0)}) · {_num(p['broker_cpu_per_1000']['median'], 2)}, "
                f"{_num(p['worker_cpu_per_1000']['median'], 2)}"
            )
        where = f"{nodes} RabbitMQ node{'s' if nodes > 1 else ''}, {slots} slot"
        lines.append(f"| {where}{'s' if slots > 1 else ''} | {cells[0]} | {cells[1]} |")
    return lines


def goal_lines(results: dict[str, Any]) -> list[str]:
    goals = results.get("goals") or {}
    ratio, over = goals.get("publish_ours_over_article"), goals.get("sleep_ours_over_ideal")
    if ratio is None and over is None:
        return []

    def verdict(met: bool | None) -> str:
        return "-" if met is None else ("met" if met else "NOT met")

    return [
        "",
        f"goals (issue #13): publish, ours confirmed / article unconfirmed = "
        f"{_num(ratio, 2)}x (>= {goals['publish_goal']:g}x: {verdict(goals['publish_goal_met'])}); "
        f"sleeping workload, ours {_num(None if over is None else over * 100, 1)} % over its "
        f"ideal (<= {goals['sleep_goal'] * 100:g} %: {verdict(goals['sleep_goal_met'])})",
    ]


def _ideal_text(config: dict[str, Any]) -> str:
    runs = config["runs"]
    if not runs or "sleep" not in runs[0]:
        return "-"
    sleep = runs[0]["sleep"]
    return (
        f"{sleep['ideal_s']:.2f} s = {sleep['tasks']} x {sleep['task_seconds']:g} s / "
        f"{sleep['slots']} slots ({sleep['pool']} x {sleep['concurrency_per_worker']} x 3 workers)"
    )


def plot_results(path: str | os.PathLike[str], results: dict[str, Any]) -> None:
    """One panel per metric: a bar per configuration at the median, min-max error
    bars, each run as a dot; the ideal drain time as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = results["configs"]
    cols = 3
    rows = (len(METRICS) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(13, 4 * rows), dpi=100)
    try:
        for ax, m in zip(axes.flat, METRICS, strict=False):
            for x, key in enumerate(CONFIG_KEYS):
                stats = configs[key]["summary"][m.key]
                med = stats["median"]
                if med is None:
                    ax.text(x, 0, "n/a", ha="center", va="bottom")
                    continue
                err = [[med - stats["min"]], [stats["max"] - med]]
                ax.bar(x, med, width=0.6, color=COLORS[key], yerr=err, capsize=6)
                values = [v for v in stats["values"] if v is not None]
                ax.scatter([x] * len(values), values, color="black", s=12, zorder=3)
                ax.annotate(
                    _num(med, m.digits),
                    (x, med),
                    xytext=(8, 4),  # beside the error bar, not on it
                    textcoords="offset points",
                    ha="left",
                    va="bottom",
                    fontsize="small",
                )
                if m.key == "sleep_drain_s":
                    ideal = configs[key]["summary"][IDEAL_KEY]["median"]
                    if ideal is not None:
                        ax.hlines(ideal, x - 0.3, x + 0.3, colors="red", linestyles="--")
            if m.key == "sleep_drain_s":
                ax.plot([], [], "r--", label="ideal: tasks x s / slots")
                ax.legend(fontsize="small", loc="upper right")
            ax.set_xticks(range(len(CONFIG_KEYS)), [CONFIG_LABELS[k] for k in CONFIG_KEYS])
            ax.set_title(m.label, fontsize="medium")
            ax.set_ylabel(m.unit)
            ax.set_ylim(bottom=0)
            top = max(configs[k]["summary"][m.key]["max"] or 0 for k in CONFIG_KEYS)
            if m.key == "sleep_drain_s":
                top = max(
                    [top] + [configs[k]["summary"][IDEAL_KEY]["max"] or 0 for k in CONFIG_KEYS]
                )
            ax.set_ylim(0, top * 1.2 if top > 0 else (1 if m.unit == "tasks" else 0.1))
            ax.grid(axis="y", alpha=0.3)
        spare = list(axes.flat)[len(METRICS) :]
        if len(spare) >= 2:
            _plot_scaling(spare[0], configs)
            _plot_cpu(spare[1], configs)
            spare = spare[2:]
        for ax in spare:
            ax.axis("off")
        machine = results["machine"]
        fig.suptitle(
            f"article (ha-all mirrored classic queue, Celery defaults) vs ours (quorum queue, "
            f"shipped settings): median of {results['params'].get('runs')} runs, bars = min-max\n"
            f"{results['date']} · {machine.get('cpus')} CPUs · RabbitMQ {machine.get('rabbitmq')} "
            f"· Celery {machine.get('celery')}",
            fontsize="medium",
        )
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


def _plot_scaling(ax: Any, configs: dict[str, Any]) -> None:
    """Drain rate against worker slots: a line per side on 3 nodes, a hollow marker on 1."""
    for key in CONFIG_KEYS:
        for nodes, style in ((3, "-o"), (1, "s")):
            points = [p for p in configs[key]["scaling"] if p["nodes"] == nodes]
            points = [p for p in points if p["rate"]["median"] is not None]
            if not points:
                continue
            xs = [p["slots"] for p in points]
            ys = [p["rate"]["median"] for p in points]
            err = [
                [y - p["rate"]["min"] for y, p in zip(ys, points, strict=True)],
                [p["rate"]["max"] - y for y, p in zip(ys, points, strict=True)],
            ]
            kwargs: dict[str, Any] = {"color": COLORS[key], "capsize": 4}
            if nodes == 1:
                kwargs.update(markerfacecolor="none", markersize=9, linestyle="none")
            ax.errorbar(
                xs,
                ys,
                yerr=err,
                fmt=style,
                label=f"{key}, {nodes} node{'s' if nodes > 1 else ''}",
                **kwargs,
            )
    if ax.has_data():
        ax.set_xscale("log", base=2)
        slots = sorted({p["slots"] for k in CONFIG_KEYS for p in configs[k]["scaling"]})
        ax.set_xticks(slots, [str(n) for n in slots])  # the measured points, not 2^n
        ax.legend(fontsize="small", loc="lower right")
    else:
        ax.text(0.5, 0.5, "n/a", ha="center", transform=ax.transAxes)
    ax.set_title("drain rate of no-op tasks vs worker slots", fontsize="medium")
    ax.set_xlabel("worker slots (pods x concurrency)")
    ax.set_ylabel("tasks/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)


def _plot_cpu(ax: Any, configs: dict[str, Any]) -> None:
    """CPU seconds per 1,000 tasks, broker and clients, publishing and draining: medians."""
    width = 0.38
    labels = [m.label.split(": ", 1)[1] for m in CPU_METRICS]
    for i, key in enumerate(CONFIG_KEYS):
        values = [configs[key]["summary"][m.key]["median"] or 0 for m in CPU_METRICS]
        xs = [x + (i - 0.5) * width for x in range(len(CPU_METRICS))]
        ax.bar(xs, values, width=width, color=COLORS[key], label=key)
        for x, v in zip(xs, values, strict=True):
            ax.annotate(
                f"{v:.2f}",
                (x, v),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize="x-small",
            )
    ax.set_xticks(range(len(CPU_METRICS)), labels, fontsize="x-small", rotation=15)
    ax.set_title("CPU seconds per 1,000 tasks (medians)", fontsize="medium")
    ax.set_ylabel("CPU s")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
