"""localcluster.rootfs: the cached Debian roots, built once, atomically, with pinned versions.

Every build here runs against a fake :class:`~localcluster.rootfs.System` (commands
recorded, mounts kept in a list, debootstrap making a few directories) in a
temporary cache; tests/integration/test_rootfs.py checks the real roots.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

from localcluster import rootfs
from localcluster.rootfs import RABBITMQ_3_10, RABBITMQ_4_3, RootfsError, RootSpec

HOST_ONLY_VAR = "RABBITMQ_HOME"


class FakeSystem(rootfs.System):
    """Records every command; mounts are a list; chroot'ed apt is simulated."""

    def __init__(
        self,
        *,
        root: bool = True,
        debootstrap: str | None = "/usr/sbin/debootstrap",
        offered: Mapping[str, list[str]] | None = None,
        fail_at: str | None = None,
        interrupt_at: str | None = None,
        sigterm_at: str | None = None,
        busy_umount: bool = False,
        installs: Mapping[str, str] | None = None,
    ) -> None:
        self.root = root
        self.debootstrap = debootstrap
        self.offered = dict(offered or {})
        self.fail_at = fail_at
        self.interrupt_at = interrupt_at
        self.sigterm_at = sigterm_at
        self.busy_umount = busy_umount
        self.installs = dict(installs or {})  # package -> version dpkg reports instead
        self.commands: list[list[str]] = []
        self.envs: list[Mapping[str, str] | None] = []
        self.mounted: list[Path] = []
        self.installed: dict[str, str] = {}

    def is_root(self) -> bool:
        return self.root

    def which(self, name: str) -> str | None:
        return self.debootstrap if name == "debootstrap" else f"/usr/bin/{name}"

    def exists(self, path: Path) -> bool:
        return True

    def free_bytes(self, path: Path) -> int:
        return 100 << 30

    def mount_points(self) -> list[Path]:
        return [Path("/proc"), Path("/sys"), *self.mounted]

    def ran(self, needle: str) -> bool:
        return any(needle in " ".join(command) for command in self.commands)

    def run(self, args: Sequence[str], *, env: Mapping[str, str] | None = None) -> str:
        args = list(args)
        line = " ".join(args)
        self.commands.append(args)
        self.envs.append(env)
        if self.interrupt_at and self.interrupt_at in line:
            raise KeyboardInterrupt
        if self.sigterm_at and self.sigterm_at in line:
            os.kill(os.getpid(), signal.SIGTERM)
        if self.fail_at and self.fail_at in line:
            raise RootfsError(f"`{line}` failed (exit status 100):\nE: simulated")
        if args[0].endswith("debootstrap"):
            target = Path(args[-2])
            for folder in ("etc/apt/apt.conf.d", "usr/sbin", "proc", "var/lib/apt/lists", "tmp"):
                (target / folder).mkdir(parents=True, exist_ok=True)
            return "I: Base system installed successfully.\n"
        if args[0] == "mount":
            self.mounted.append(Path(args[-1]))
            return ""
        if args[0] == "umount":
            if self.busy_umount and "--lazy" not in args:
                raise RootfsError(f"`{line}` failed: target is busy")
            self.mounted.remove(Path(args[-1]))
            return ""
        assert args[0] == "chroot", line
        target, command = Path(args[1]), args[2:]
        if command[:2] == ["apt-get", "update"]:
            (target / "var/lib/apt/lists/deb.debian.org_debian_dists_sid_InRelease").write_text("x")
            return ""
        if command[:2] == ["apt-cache", "madison"]:
            return "".join(
                f"{package:>15} | {version} | {rootfs.MIRROR} sid/main amd64 Packages\n"
                for package in command[2:]
                for version in self.offered.get(package, [])
            )
        if command[:2] == ["apt-get", "install"]:
            assert target / "proc" in self.mounted  # apt runs with proc mounted
            for pinned in (word for word in command if "=" in word):
                package, version = pinned.split("=", 1)
                self.installed[package] = self.installs.get(package, version)
            # What the installed packages put in place: RabbitMQ's server, promtool.
            shipped = {"rabbitmq-server": rootfs.SERVER, "prometheus": "usr/bin/promtool"}
            for package in self.installed:
                path = target / shipped[package] if package in shipped else None
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("#!/bin/sh\n")
            return ""
        if command[0] == "dpkg-query":
            return self.installed[command[-1]]
        if command[:2] == ["apt-get", "clean"]:
            return ""
        raise AssertionError(f"unexpected command {line}")


def offering(spec: RootSpec) -> dict[str, list[str]]:
    return {package: [version] for package, version in spec.packages}


def leftovers(cache: Path) -> list[str]:
    """Temporary build directories in the cache."""
    return sorted(p.name for p in cache.glob(".*.tmp-*"))


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "rootfs"
    monkeypatch.setenv(rootfs.CACHE_ENV, str(path))
    monkeypatch.setenv(HOST_ONLY_VAR, "/usr/lib/rabbitmq")
    return path


def test_each_root_is_declared_once_with_exact_pins() -> None:
    assert rootfs.ROOTS == (RABBITMQ_4_3, RABBITMQ_3_10)
    assert rootfs.roots() == {
        "rabbitmq-4.3": RABBITMQ_4_3,
        "rabbitmq-3.10": RABBITMQ_3_10,
        "prometheus": rootfs.PROMETHEUS,
    }
    assert (*rootfs.ROOTS, rootfs.PROMETHEUS) == rootfs.ALL_ROOTS
    assert (RABBITMQ_4_3.suite, RABBITMQ_4_3.pins) == (
        "sid",
        {"rabbitmq-server": "4.3.6-1", "erlang-base": "1:29.1.2+dfsg-1"},
    )
    assert (RABBITMQ_3_10.suite, RABBITMQ_3_10.version) == ("bookworm", "3.10.8-1.1+deb12u1")
    assert [s.upstream_version for s in rootfs.ROOTS] == ["4.3.6", "3.10.8"]
    # The folder carries the pinned version: a version bump builds a new root.
    assert RABBITMQ_4_3.dir_name == "rabbitmq-4.3_4.3.6-1"
    assert rootfs.MIRROR == "http://deb.debian.org/debian"


def test_a_root_is_found_by_rabbitmq_major_minor() -> None:
    assert rootfs.for_version("4.3") is RABBITMQ_4_3
    assert rootfs.for_version("3.10.8") is RABBITMQ_3_10
    with pytest.raises(RootfsError, match=r"no root filesystem runs RabbitMQ 3\.13"):
        rootfs.for_version("3.13.7")


def test_the_cache_is_outside_the_work_tree_unless_overridden(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(rootfs.CACHE_ENV, raising=False)
    assert rootfs.root_path(RABBITMQ_4_3) == Path(
        "/var/cache/celery-cluster/rootfs/rabbitmq-4.3_4.3.6-1"
    )
    monkeypatch.setenv(rootfs.CACHE_ENV, str(tmp_path))
    assert rootfs.root_path(RABBITMQ_3_10) == tmp_path / "rabbitmq-3.10_3.10.8-1.1+deb12u1"


def test_a_build_installs_the_pins_and_renames_a_marked_root_into_place(cache: Path) -> None:
    system = FakeSystem(offered=offering(RABBITMQ_4_3))
    path = rootfs.ensure_root(RABBITMQ_4_3, system=system)

    assert path == cache / "rabbitmq-4.3_4.3.6-1"
    assert rootfs.problem(RABBITMQ_4_3) is None
    debootstrap = system.commands[0]
    assert debootstrap[0] == "/usr/sbin/debootstrap" and "--variant=minbase" in debootstrap
    assert debootstrap[-3:-2] == ["sid"] and debootstrap[-1] == rootfs.MIRROR
    assert Path(debootstrap[-2]).parent == cache  # a temporary sibling, renamed afterwards
    install = next(c for c in system.commands if c[2:4] == ["apt-get", "install"])
    assert "rabbitmq-server=4.3.6-1" in install and "erlang-base=1:29.1.2+dfsg-1" in install
    assert "--no-install-recommends" in install

    marker = json.loads((path / rootfs.MARKER).read_text())
    assert marker["suite"] == "sid" and marker["mirror"] == rootfs.MIRROR
    assert marker["pinned"] == marker["installed"] == RABBITMQ_4_3.pins
    assert marker["build_seconds"] >= 0
    # proc only for the installation; nothing left mounted, no temporary directory.
    assert system.ran(f"mount -t proc proc {debootstrap[-2]}/proc")
    assert system.ran(f"umount {debootstrap[-2]}/proc")
    assert system.mounted == [] and leftovers(cache) == []
    # No service starts, the expired snapshot Release is accepted, apt cleaned.
    assert (path / "usr/sbin/policy-rc.d").read_text().rstrip().endswith("exit 101")
    assert os.access(path / "usr/sbin/policy-rc.d", os.X_OK)
    assert "Check-Valid-Until" in (path / "etc/apt/apt.conf.d/99celery-cluster-rootfs").read_text()
    assert system.ran("apt-get clean")
    assert [p.name for p in (path / "var/lib/apt/lists").iterdir()] == []
    assert path.stat().st_mode & 0o777 == 0o755  # the root's "/", not mkdtemp's 0700


def test_commands_in_the_root_get_none_of_the_hosts_environment(cache: Path) -> None:
    system = FakeSystem(offered=offering(RABBITMQ_4_3))
    rootfs.ensure_root(RABBITMQ_4_3, system=system)
    chroot_envs = [
        env for cmd, env in zip(system.commands, system.envs, strict=True) if cmd[0] == "chroot"
    ]
    assert chroot_envs and all(env is not None for env in chroot_envs)
    for env in chroot_envs:
        assert env is not None and HOST_ONLY_VAR not in env
        assert env["PATH"] == "/usr/sbin:/usr/bin:/sbin:/bin"


def test_a_valid_root_is_not_rebuilt_and_needs_no_root(cache: Path) -> None:
    first = rootfs.ensure_root(RABBITMQ_4_3, system=FakeSystem(offered=offering(RABBITMQ_4_3)))
    (first / "kept").write_text("still here")
    again = FakeSystem(root=False, debootstrap=None)
    assert rootfs.ensure_root(RABBITMQ_4_3, system=again) == first
    assert again.commands == [] and (first / "kept").exists()


def _half_built(path: Path) -> None:
    (path / "usr/bin").mkdir(parents=True)


def _no_marker(path: Path) -> None:
    (path / rootfs.SERVER).parent.mkdir(parents=True)
    (path / rootfs.SERVER).touch()


def _corrupt_marker(path: Path) -> None:
    _no_marker(path)
    (path / rootfs.MARKER).write_text("{not json")


def _other_pins(path: Path) -> None:
    _no_marker(path)
    old = {"rabbitmq-server": "4.3.6-1", "erlang-base": "1:29.0.0+dfsg-1"}
    marker = {"format": 1, "name": "rabbitmq-4.3", "suite": "sid", "pinned": old, "installed": old}
    (path / rootfs.MARKER).write_text(json.dumps(marker))


def _other_installed(path: Path) -> None:
    _no_marker(path)
    installed = {"rabbitmq-server": "4.3.7-1", "erlang-base": "1:29.1.2+dfsg-1"}
    marker = {
        "format": 1,
        "name": "rabbitmq-4.3",
        "suite": "sid",
        "pinned": RABBITMQ_4_3.pins,
        "installed": installed,
    }
    (path / rootfs.MARKER).write_text(json.dumps(marker))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_half_built, "no valid marker"),
        (_no_marker, "no valid marker"),
        (_corrupt_marker, "no valid marker"),
        (_other_pins, "other pins"),
        (_other_installed, "installed versions"),
    ],
)
def test_an_invalid_root_is_removed_and_rebuilt(
    cache: Path, damage: Callable[[Path], None], reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = rootfs.root_path(RABBITMQ_4_3)
    path.mkdir(parents=True)
    (path / "leftover").write_text("from the broken build")
    damage(path)
    assert reason in (rootfs.problem(RABBITMQ_4_3) or "")

    system = FakeSystem(offered=offering(RABBITMQ_4_3))
    assert rootfs.ensure_root(RABBITMQ_4_3, system=system) == path
    assert rootfs.problem(RABBITMQ_4_3) is None
    assert not (path / "leftover").exists()
    assert f"removing {path}: " in capsys.readouterr().out


def test_the_directory_of_an_interrupted_build_is_removed(cache: Path) -> None:
    stale = cache / f".{RABBITMQ_4_3.dir_name}.tmp-deadbeef"
    (stale / "usr").mkdir(parents=True)
    other = cache / f".{RABBITMQ_3_10.dir_name}.tmp-cafe"  # another root's: not ours to touch
    other.mkdir()
    rootfs.ensure_root(RABBITMQ_4_3, system=FakeSystem(offered=offering(RABBITMQ_4_3)))
    assert not stale.exists() and other.exists()


def test_a_version_bump_builds_a_new_root_beside_the_old_one(cache: Path) -> None:
    old = rootfs.ensure_root(RABBITMQ_4_3, system=FakeSystem(offered=offering(RABBITMQ_4_3)))
    bumped = RootSpec(
        "rabbitmq-4.3", "sid", (("rabbitmq-server", "4.3.7-1"), ("erlang-base", "1:29.1.2+dfsg-1"))
    )
    new = rootfs.ensure_root(bumped, system=FakeSystem(offered=offering(bumped)))
    assert new == cache / "rabbitmq-4.3_4.3.7-1" and new != old
    assert rootfs.problem(RABBITMQ_4_3) is None and rootfs.problem(bumped) is None


def test_a_mirror_offering_another_version_fails_naming_package_pin_and_offer(
    cache: Path,
) -> None:
    offered = {**offering(RABBITMQ_4_3), "rabbitmq-server": ["4.3.7-1"]}
    system = FakeSystem(offered=offered)
    with pytest.raises(RootfsError) as raised:
        rootfs.ensure_root(RABBITMQ_4_3, system=system)
    message = str(raised.value)
    assert "rabbitmq-server 4.3.7-1, not the pinned 4.3.6-1" in message
    assert rootfs.MIRROR in message and "(sid)" in message
    assert not system.ran("apt-get install")
    assert system.mounted == [] and leftovers(cache) == []
    assert not rootfs.root_path(RABBITMQ_4_3).exists()


def test_a_mirror_without_the_package_says_so(cache: Path) -> None:
    offered = {"rabbitmq-server": ["3.10.8-1.1+deb12u1"]}  # no erlang-base at all
    with pytest.raises(RootfsError, match=r"offers erlang-base \(no version at all\), not"):
        rootfs.ensure_root(RABBITMQ_3_10, system=FakeSystem(offered=offered))
    assert leftovers(cache) == []


@pytest.mark.parametrize("step", ["debootstrap", "apt-get update", "apt-get install", "dpkg-query"])
def test_a_failed_build_leaves_no_temporary_directory_and_nothing_mounted(
    cache: Path, step: str
) -> None:
    system = FakeSystem(offered=offering(RABBITMQ_4_3), fail_at=step)
    with pytest.raises(RootfsError, match="simulated"):
        rootfs.ensure_root(RABBITMQ_4_3, system=system)
    assert system.mounted == [] and leftovers(cache) == []
    assert not rootfs.root_path(RABBITMQ_4_3).exists()


def test_installed_versions_are_read_back_and_must_equal_the_pins(cache: Path) -> None:
    system = FakeSystem(offered=offering(RABBITMQ_4_3), installs={"erlang-base": "1:29.1.3-1"})
    with pytest.raises(RootfsError, match=r"installed .*1:29\.1\.3-1"):
        rootfs.ensure_root(RABBITMQ_4_3, system=system)
    assert system.mounted == [] and leftovers(cache) == []


def test_ctrl_c_during_the_install_unmounts_proc_and_removes_the_build(cache: Path) -> None:
    system = FakeSystem(offered=offering(RABBITMQ_4_3), interrupt_at="apt-get install")
    with pytest.raises(KeyboardInterrupt):
        rootfs.ensure_root(RABBITMQ_4_3, system=system)
    assert system.ran("umount") and system.mounted == [] and leftovers(cache) == []


def test_sigterm_during_the_install_unmounts_proc_and_removes_the_build(cache: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    system = FakeSystem(offered=offering(RABBITMQ_4_3), sigterm_at="apt-get install")
    with pytest.raises(KeyboardInterrupt):
        rootfs.ensure_root(RABBITMQ_4_3, system=system)
    assert system.mounted == [] and leftovers(cache) == []
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_busy_proc_is_detached_lazily(cache: Path) -> None:
    system = FakeSystem(offered=offering(RABBITMQ_4_3), busy_umount=True, fail_at="apt-get install")
    with pytest.raises(RootfsError, match="simulated"):
        rootfs.ensure_root(RABBITMQ_4_3, system=system)
    assert system.ran("umount --lazy") and system.mounted == [] and leftovers(cache) == []


def test_not_root_fails_before_anything_naming_the_command(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = FakeSystem(root=False)
    with pytest.raises(RootfsError) as raised:
        rootfs.ensure_root(RABBITMQ_4_3, system=system)
    # sudo drops the environment: the override is spelled out in the command.
    assert f"sudo env {rootfs.CACHE_ENV}={cache} make setup" in str(raised.value)
    monkeypatch.delenv(rootfs.CACHE_ENV)
    with pytest.raises(RootfsError) as raised:
        rootfs.ensure_root(RABBITMQ_4_3, cache=cache, system=system)
    assert "needs root" in str(raised.value)
    assert "    sudo make setup    (or: sudo python3 -m localcluster.rootfs)" in str(raised.value)
    assert system.commands == [] and not cache.exists()


def test_no_debootstrap_fails_before_anything_naming_the_install(cache: Path) -> None:
    system = FakeSystem(debootstrap=None)
    with pytest.raises(RootfsError, match="apt-get install -y debootstrap"):
        rootfs.ensure_root(RABBITMQ_3_10, system=system)
    assert system.commands == [] and not cache.exists()


def test_mounts_under_lists_the_deepest_first(tmp_path: Path) -> None:
    system = FakeSystem()
    system.mounted = [tmp_path / "r", tmp_path / "r/proc", tmp_path / "r2", tmp_path / "r/dev/pts"]
    assert rootfs.mounts_under(tmp_path / "r", system) == [
        tmp_path / "r/dev/pts",
        tmp_path / "r/proc",
        tmp_path / "r",
    ]


def test_proc_mounts_fields_are_unescaped() -> None:
    assert rootfs._unescape_mount_field("/var/cache/a\\040b\\134c") == "/var/cache/a b\\c"


def test_check_reports_missing_roots_with_the_command(
    cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert rootfs.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "rabbitmq-4.3" in err and "not built" in err and "make setup" in err
    for spec in rootfs.ALL_ROOTS:
        rootfs.ensure_root(spec, system=FakeSystem(offered=offering(spec)))
    capsys.readouterr()
    assert rootfs.main(["--check"]) == 0
    out = capsys.readouterr().out
    assert "rabbitmq-server 4.3.6-1" in out and "rabbitmq-server 3.10.8-1.1+deb12u1" in out
    assert "prometheus 2.42.0+ds-5+deb12u1" in out


def test_promtool_comes_from_its_built_root_or_says_how_to_build_it(cache: Path) -> None:
    with pytest.raises(RootfsError, match=r"promtool comes from the root prometheus .*not built"):
        rootfs.promtool()
    rootfs.ensure_root(rootfs.PROMETHEUS, system=FakeSystem(offered=offering(rootfs.PROMETHEUS)))
    path = rootfs.promtool()
    assert path == rootfs.root_path(rootfs.PROMETHEUS) / "usr/bin/promtool" and path.exists()
