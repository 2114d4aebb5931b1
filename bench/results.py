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
#: Not plotted as a bar of its own: drawn as the ideal line over the drain time.
IDEAL_KEY = "sleep_ideal_s"
_IDEAL = Metric(IDEAL_KEY, "sleeping workload: ideal (tasks x seconds / slots)", "s", False, 1)


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
        summary = {m.key: spread([r.get(m.key) for r in config_runs]) for m in (*METRICS, _IDEAL)}
        per_config[key] = {
            "settings": configs.get(key, {}),
            "rabbitmq": rabbitmq_versions.get(key),
            "twin": twins.get(key),
            "queue_check": checks.get(key),
            "summary": summary,
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
            for m in (*METRICS, _IDEAL)
        ],
        "configs": per_config,
        "comparison": comparison,
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
        for ax in list(axes.flat)[len(METRICS) :]:
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
