"""What a SIGKILLed run leaves (pods, namespaces, bridge, cgroups, files) is swept
by the next run; a run whose owner lives is left alone. Needs root (as every pod)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from localcluster import podnet, pods, twin


def _fake_run(runs_dir: Path, run_id: str, owner_pid: int) -> tuple[subprocess.Popen[bytes], Path]:
    run_dir = runs_dir / run_id
    run_dir.mkdir(parents=True)
    (run_dir / twin.OWNER_FILE).write_text(twin._owner_token(owner_pid))
    network = podnet.PodNetwork(run_id)
    network.attach("pod-0")
    for controller in pods.CONTROLLERS:
        (pods.run_cgroup(controller, run_id) / "pod-0").mkdir(parents=True)
    member = subprocess.Popen(["sleep", "300"])
    (pods.run_cgroup("pids", run_id) / "pod-0" / "cgroup.procs").write_text(str(member.pid))
    return member, run_dir


def test_a_dead_owners_run_is_swept_and_a_live_ones_is_kept(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    token_pid = gone.pid
    dead_member, dead_dir = _fake_run(tmp_path, "dead01", token_pid)
    gone.wait()  # its owner is gone now
    live_member, live_dir = _fake_run(tmp_path, "live01", os.getpid())
    try:
        assert twin.sweep_stale_runs(tmp_path) == ["dead01"]
        assert dead_member.wait(10) == -9
        assert not dead_dir.exists()
        assert not list(podnet.NETNS_DIR.glob("lcdead01-*"))
        assert subprocess.run(["ip", "link", "show", "lcdead01br"], capture_output=True).returncode
        assert not pods.run_cgroup("memory", "dead01").exists()
        # The live run is untouched.
        assert live_member.poll() is None and live_dir.exists()
        assert list(podnet.NETNS_DIR.glob("lclive01-*"))
    finally:
        live_member.kill()
        live_member.wait()
        (live_dir / twin.OWNER_FILE).write_text("")  # now stale: the sweep removes it
        assert twin.sweep_stale_runs(tmp_path) == ["live01"]
        assert not list(podnet.NETNS_DIR.glob("lclive01-*"))
