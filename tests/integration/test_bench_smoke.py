"""``python -m bench`` (``make bench``) runs end to end on the pod twins at a tiny size.

A smoke test, not a benchmark: one run per configuration, a few dozen tasks. It
asserts what the bench must get right whatever the numbers: the article's side ran
on RabbitMQ 3.10 pods with a mirrored classic queue, ours on the 4.3 pods as shipped
with a quorum queue, ours lost nothing to the RabbitMQ pod kill, every metric has a
value, and neither twin left a process, network namespace, cgroup or directory
behind. No timing is asserted (the numbers are in docs/bench.md, measured at full
size). About 3 minutes here (2 cores): ~1 minute of it is booting 6 RabbitMQ pods,
and each side's pod kill waits ~20 s for the new pod's probes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.results import CONFIG_KEYS, IDEAL_KEY, METRICS
from localcluster import podnet, pods, twin

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PER_RUN_KEYS = {"publish", "drain", "sleep", "failover", "idle_twin_cpu_s"}


def _left_on_the_machine(run_id: str) -> dict[str, list[str]]:
    """What a twin run could leave, looked up independently of the bench's own check."""
    netns = podnet.NETNS_DIR
    bridge = subprocess.run(
        ["ip", "link", "show", f"lc{run_id}br"], capture_output=True, check=False
    )
    return {
        "directory": [str(p) for p in [twin.RUNS_DIR / run_id] if p.exists()],
        "netns": sorted(p.name for p in netns.iterdir() if p.name.startswith(f"lc{run_id}-"))
        if netns.is_dir()
        else [],
        "bridge": [f"lc{run_id}br"] if bridge.returncode == 0 else [],
        "cgroups": [str(d) for c in pods.CONTROLLERS if (d := pods.run_cgroup(c, run_id)).exists()],
    }


def test_bench_runs_on_the_pod_twins_and_writes_results(tmp_path: Path) -> None:
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
            # Nothing below each side's most slots: the scaling curve's points here are the
            # drain phase's (3 nodes) and the 1-node twin's (the slot layouts and the
            # curve's summary are unit-tested: tests/unit/test_bench_throughput.py).
            "--scaling-slots",
            "96",
            "--scaling-tasks",
            "20",
            "--timeout",
            "120",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=420,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"

    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "ok"
    assert results["problems"] == []
    for key in ("date", "command", "machine", "params", "timings_s", "comparison"):
        assert key in results
    assert "article workers" in results["bench_adaptations"]
    for config in CONFIG_KEYS:
        entry = results["configs"][config]
        assert len(entry["runs"]) == 1
        assert entry["runs"][0].keys() >= PER_RUN_KEYS
        for metric in (*(m.key for m in METRICS), IDEAL_KEY):
            stats = entry["summary"][metric]
            assert {"values", "median", "min", "max"} <= stats.keys(), (config, metric)
            assert stats["median"] is not None, (config, metric)

    article, ours = results["configs"]["article"], results["configs"]["ours"]
    # What `rabbitmqctl version` printed in each side's pods.
    assert article["rabbitmq"].startswith("3.10."), article["rabbitmq"]
    assert ours["rabbitmq"].startswith("4.3."), ours["rabbitmq"]
    # Two twins of the prod stack; only the 3.10 one needed the peer-discovery change.
    assert article["twin"]["stack"] == ours["twin"]["stack"] == "prod"
    assert article["twin"]["run_id"] != ours["twin"]["run_id"]
    assert twin.PEER_DISCOVERY_ADAPTATION in article["twin"]["adaptations"]
    assert twin.PEER_DISCOVERY_ADAPTATION not in ours["twin"]["adaptations"]
    assert ours["twin"]["rabbitmq_image"] == "rabbitmq:4.3.6-management"  # as shipped
    # The article's run really used a mirrored classic queue, ours a quorum queue.
    assert article["queue_check"]["type"] == "classic"
    assert article["queue_check"]["policy"] == "ha-all"
    assert len(article["queue_check"]["synchronised_slave_pids"]) == 2
    assert ours["queue_check"]["type"] == "quorum"
    assert len(ours["queue_check"]["members"]) == 3
    # Ours loses nothing when the RabbitMQ pod its worker uses is SIGKILLed.
    failover = ours["runs"][0]["failover"]
    assert failover["published"] == 40 and failover["lost"] == 0, failover
    assert failover["killed_pod"].startswith("rabbitmq-server-")

    # The scaling curve: the side's most slots on 3 nodes (the drain phase's 120 tasks)
    # and on the 1-node twin (3 worker pods at the side's concurrency); each point
    # drained every task and counted the broker's and workers' CPU.
    for config, most in ((article, 6), (ours, 96)):
        points = {(p["nodes"], p["slots"]): p for p in config["runs"][0]["scaling"]}
        assert sorted(points) == [(1, most), (3, most)], sorted(points)
        for (nodes, _), point in points.items():
            assert point["tasks"] == (120 if nodes == 3 else 20), point
            assert point["rate"] > 0 and point["pods"] == 3, point
            assert point["broker_cpu_s"] > 0 and point["worker_cpu_s"] > 0, point
        assert [(p["nodes"], p["slots"]) for p in config["scaling"]] == [(1, most), (3, most)]
        assert config["single_node_twin"]["stack"] == "prod"
        for key in ("publish_broker_cpu_per_1000", "drain_worker_cpu_per_1000"):
            assert config["summary"][key]["median"] > 0, (key, config["summary"][key])
    # The sleeping workload's time beyond its ideal, by cause, adds up.
    sleep = ours["runs"][0]["sleep"]
    parts = sum(sleep[k] for k in ("ramp_s", "steady_s", "overrun_s", "tail_s"))
    assert abs(parts - (sleep["drain_s"] - sleep["ideal_s"])) < 1e-6, sleep
    assert {"publish_goal_met", "sleep_goal_met"} <= results["goals"].keys()

    # Nothing left: the bench's own check, and a look at the machine.
    for config in (article, ours):
        for entry in (config["twin"], config["single_node_twin"]):
            assert entry["leftovers"] == {}, entry
            left = _left_on_the_machine(entry["run_id"])
            assert left == {k: [] for k in left}, left

    assert (out / "bench.png").read_bytes()[:8] == PNG_MAGIC
    assert "| metric |" in proc.stdout  # the table
