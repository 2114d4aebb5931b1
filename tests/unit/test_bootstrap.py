"""tools/bootstrap.py: three hash-locked virtualenvs, each synced only when its lock changed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tools import bootstrap


def test_every_venv_has_a_hash_locked_requirements_file() -> None:
    assert [v.name for v, _ in bootstrap.VENVS] == [".venv", ".venv-policy", ".venv-scan"]
    for _, lock in bootstrap.VENVS:
        pins = re.findall(r"^([A-Za-z0-9_.-]+)==\S+ \\$", lock.read_text(), re.MULTILINE)
        assert pins, f"{lock.name}: no pinned requirement"
        # Every pin is followed by its hashes: uv/pip then refuse anything else.
        blocks = re.split(r"^(?=[A-Za-z0-9_.-]+==)", lock.read_text(), flags=re.MULTILINE)
        for block in blocks[1:]:
            assert "--hash=sha256:" in block, f"{lock.name}: {block.splitlines()[0]} has no hash"


def test_a_venv_is_synced_once_per_lock_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv = tmp_path / ".venv-x"
    python = venv / "bin" / "python"
    python.parent.mkdir(parents=True)
    lock = tmp_path / "requirements-x.txt"
    lock.write_text("a==1 \\\n    --hash=sha256:00\n")
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(bootstrap, "run", lambda *args, **_: calls.append(tuple(map(str, args))))
    monkeypatch.setattr(bootstrap, "VENV", tmp_path / ".venv-main")
    (tmp_path / ".venv-main" / "bin").mkdir(parents=True)
    (tmp_path / ".venv-main" / "bin" / "uv").touch()
    monkeypatch.setattr(bootstrap, "ROOT", tmp_path)

    bootstrap.ensure_packages(python, lock)
    bootstrap.ensure_packages(python, lock)
    assert len(calls) == 1 and "sync" in calls[0] and str(lock) in calls[0]
    assert (venv / ".requirements-x.sha256").exists()

    lock.write_text("a==2 \\\n    --hash=sha256:11\n")
    bootstrap.ensure_packages(python, lock)
    assert len(calls) == 2


@pytest.mark.parametrize("euid", [0, 1000])
def test_nftables_installed_for_the_partition_fault_only_as_root(
    euid: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(bootstrap, "run", lambda *args, **_: calls.append(tuple(map(str, args))))
    monkeypatch.setattr(bootstrap.os, "geteuid", lambda: euid)
    monkeypatch.setattr(
        bootstrap.shutil, "which", lambda name: None if name == "nft" else f"/usr/bin/{name}"
    )
    bootstrap.ensure_nftables()  # never fatal: only the network faults need it
    if euid == 0:
        assert calls[-1][:4] == ("apt-get", "install", "-y", "--no-install-recommends")
        assert "nftables" in calls[-1]
    else:
        assert calls == []


def test_present_roots_need_neither_root_nor_debootstrap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bootstrap.rootfs, "problem", lambda spec: None)
    monkeypatch.setattr(bootstrap.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(bootstrap, "run", lambda *a, **k: pytest.fail(f"ran {a}"))
    monkeypatch.setattr(bootstrap.rootfs, "ensure_root", lambda spec: pytest.fail("built"))
    bootstrap.ensure_rootfs()


def test_missing_roots_without_root_exit_naming_the_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        bootstrap.rootfs, "problem", lambda spec: "not built" if spec.suite == "sid" else None
    )
    monkeypatch.setattr(bootstrap.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(bootstrap, "run", lambda *a, **k: pytest.fail(f"ran {a}"))
    monkeypatch.setattr(bootstrap.rootfs, "ensure_root", lambda spec: pytest.fail("built"))
    with pytest.raises(SystemExit) as exited:
        bootstrap.ensure_rootfs()
    message = str(exited.value.code)
    assert "sudo make setup" in message and "sudo python3 -m localcluster.rootfs" in message
    assert "rabbitmq-4.3" in message and "rabbitmq-3.10" not in message


def test_as_root_debootstrap_is_installed_then_the_missing_roots_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, ...]] = []
    built: list[str] = []
    monkeypatch.setattr(bootstrap, "run", lambda *args, **_: calls.append(tuple(map(str, args))))
    monkeypatch.setattr(bootstrap.os, "geteuid", lambda: 0)
    monkeypatch.setattr(bootstrap.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(bootstrap.rootfs, "find_debootstrap", lambda: None)
    monkeypatch.setattr(bootstrap.rootfs, "problem", lambda spec: "not built")
    monkeypatch.setattr(bootstrap.rootfs, "ensure_root", lambda spec: built.append(spec.name))
    bootstrap.ensure_rootfs()
    assert calls[-1][:2] == ("apt-get", "install") and "debootstrap" in calls[-1]
    assert built == ["rabbitmq-4.3", "rabbitmq-3.10", "prometheus"]


def test_a_failed_root_build_exits_with_its_message(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(spec: object) -> None:
        raise bootstrap.rootfs.RootfsError("the mirror offers rabbitmq-server 4.3.7-1")

    monkeypatch.setattr(bootstrap.os, "geteuid", lambda: 0)
    monkeypatch.setattr(bootstrap, "ensure_debootstrap", lambda: None)
    monkeypatch.setattr(bootstrap.rootfs, "problem", lambda spec: "not built")
    monkeypatch.setattr(bootstrap.rootfs, "ensure_root", fail)
    with pytest.raises(SystemExit, match=r"offers rabbitmq-server 4\.3\.7-1"):
        bootstrap.ensure_rootfs()


def test_no_rabbitmq_skips_the_roots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bootstrap.sys, "argv", ["bootstrap.py", "--no-rabbitmq"])
    monkeypatch.setattr(bootstrap, "ensure_packages", lambda *a: None)
    monkeypatch.setattr(bootstrap, "ensure_venv", lambda *a, **k: Path("python"))
    monkeypatch.setattr(bootstrap, "ensure_rootfs", lambda: pytest.fail("roots"))
    monkeypatch.setattr(bootstrap, "ensure_nftables", lambda: pytest.fail("nftables"))
    bootstrap.main()
