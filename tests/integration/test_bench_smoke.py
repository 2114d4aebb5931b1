"""``python -m bench`` (``make bench``) runs end to end at a tiny size and writes its files.

A smoke test, not a benchmark: one run per configuration, a few dozen tasks, and
only "it ran, exited 0, wrote results.json with every metric for both
configurations, and a PNG".  No timing is asserted (the numbers are in the
README, measured with the defaults).  60-90 s here (2 cores), ~20-25 s of which
is booting RabbitMQ.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.results import CONFIG_KEYS, IDEAL_KEY, METRICS
from localcluster.rabbit import MARKER_ENV as RABBIT_MARKER_ENV
from localcluster.workers import MARKER_ENV as WORKERS_MARKER_ENV
from localcluster.workers import REPO_ROOT

pytestmark = pytest.mark.rabbitmq

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PER_RUN_KEYS = {"publish", "drain", "sleep", "failover"}


def _ours_alive(pids: list[int]) -> list[int]:
    """Those pids still alive and carrying one of the bench's markers."""
    alive = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] in "ZX":
            continue
        markers = (RABBIT_MARKER_ENV.encode() + b"=", WORKERS_MARKER_ENV.encode() + b"=")
        if any(m in environ for m in markers):
            alive.append(pid)
    return alive


def test_bench_runs_and_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--runs",
            "1",
            "--publish-tasks",
            "60",
            "--sleep-tasks",
            "6",
            "--sleep-seconds",
            "0.2",
            "--failover-tasks",
            "40",
            "--failover-rate",
            "20",
            "--failover-task-seconds",
            "0.05",
            "--down-seconds",
            "0.5",
            "--settle",
            "3",
            "--timeout",
            "60",
            "--out",
            str(out),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"

    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "ok"
    assert results["problems"] == []
    for key in ("date", "command", "machine", "params", "timings_s", "comparison"):
        assert key in results
    assert results["machine"]["cpus"] and results["machine"]["rabbitmq"]
    for config in CONFIG_KEYS:
        entry = results["configs"][config]
        assert len(entry["runs"]) == 1
        assert entry["runs"][0].keys() >= PER_RUN_KEYS
        for metric in (*(m.key for m in METRICS), IDEAL_KEY):
            stats = entry["summary"][metric]
            assert {"values", "median", "min", "max"} <= stats.keys(), (config, metric)
            assert stats["median"] is not None, (config, metric)
    # The article's run really used a mirrored classic queue, ours a quorum queue.
    assert results["configs"]["article"]["queue_check"]["type"] == "classic"
    assert results["configs"]["article"]["queue_check"]["policy"] == "ha-all"
    assert results["configs"]["ours"]["queue_check"]["type"] == "quorum"

    assert (out / "bench.png").read_bytes()[:8] == PNG_MAGIC
    assert "| metric |" in proc.stdout  # the table
    assert _ours_alive(results["pids"]) == []
