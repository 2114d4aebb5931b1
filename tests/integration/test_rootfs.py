"""The real Debian root filesystems `make setup` built (localcluster/rootfs.py).

No skipping: a missing root is built here through ``ensure_root`` (as root: a few
minutes); not root and missing, the test errors with the command to run.  Commands
run inside a root with ``chroot`` as root, else in a user namespace
(``unshare --map-root-user chroot``).

``rabbitmqctl version`` needs no ``/proc`` in the root (checked), but it starts
Erlang distribution: it needs a writable HOME for its cookie and an epmd.  So each
call gets a throwaway HOME under the root's /tmp and its own epmd on a free port,
started as our tracked child (never ``epmd -daemon``); every process carries a
marker in its environment and none may survive, nor may anything stay mounted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from localcluster import rootfs
from localcluster.rootfs import RootSpec

# What each root must run, written out rather than derived from the pins.
EXPECTED = {"rabbitmq-4.3": ("sid", "4.3.6"), "rabbitmq-3.10": ("bookworm", "3.10.8")}
MARKER_ENV = "CELERY_CLUSTER_ROOTFS_TEST"


def in_root(root: Path, *args: str) -> list[str]:
    prefix = ["chroot"] if os.geteuid() == 0 else ["unshare", "--map-root-user", "chroot"]
    return [*prefix, str(root), *args]


def marked_pids(marker: str) -> list[int]:
    needle = f"{MARKER_ENV}={marker}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes().split(b"\0")
            state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if needle in environ and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module", params=rootfs.ROOTS, ids=lambda spec: spec.name)
def built(request: pytest.FixtureRequest) -> tuple[RootSpec, Path]:
    spec: RootSpec = request.param
    return spec, rootfs.ensure_root(spec)


@pytest.fixture(autouse=True)
def _nothing_left_mounted() -> Iterator[None]:
    yield
    assert rootfs.mounts_under(rootfs.cache_dir()) == []


@pytest.fixture
def erlang_env(built: tuple[RootSpec, Path]) -> Iterator[dict[str, str]]:
    """Environment for an Erlang CLI in the root: own HOME, own epmd, a marker."""
    _, root = built
    marker = uuid.uuid4().hex
    home = Path(tempfile.mkdtemp(prefix="rootfs-test-", dir=root / "tmp"))
    port = free_port()
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": f"/tmp/{home.name}",
        "LC_ALL": "C.UTF-8",
        "ERL_EPMD_PORT": str(port),
        "ERL_FLAGS": "-start_epmd false",
        MARKER_ENV: marker,
    }
    epmd = subprocess.Popen(
        in_root(root, "/usr/bin/epmd", "-port", str(port), "-address", "127.0.0.1"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert epmd.poll() is None, f"epmd in {root} exited with {epmd.returncode}"
            assert time.monotonic() < deadline, f"epmd in {root} did not listen on {port}"
            time.sleep(0.1)
        yield env
    finally:
        epmd.terminate()
        try:
            epmd.wait(10)
        except subprocess.TimeoutExpired:
            epmd.kill()
            epmd.wait()
        shutil.rmtree(home, ignore_errors=True)
        survivors = marked_pids(marker)
        for pid in survivors:  # ours (our marker): do not leave them running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        assert survivors == [], f"processes started in {root} survived: {survivors}"


def test_the_marker_records_the_pinned_versions_installed(built: tuple[RootSpec, Path]) -> None:
    spec, root = built
    suite, upstream = EXPECTED[spec.name]
    assert root == rootfs.root_path(spec) and rootfs.problem(spec) is None
    marker = rootfs.read_marker(root)
    assert marker is not None
    assert marker["suite"] == suite and marker["variant"] == "minbase"
    assert marker["pinned"] == marker["installed"] == spec.pins
    assert marker["installed"]["rabbitmq-server"].startswith(f"{upstream}-")
    assert set(marker["installed"]) == {"rabbitmq-server", "erlang-base"}


def test_the_roots_dpkg_database_has_the_pinned_versions(built: tuple[RootSpec, Path]) -> None:
    spec, root = built
    output = subprocess.run(
        in_root(root, "dpkg-query", "-W", "-f", "${Package} ${Version}\\n", *spec.pins),
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert dict(line.split(" ", 1) for line in output.splitlines()) == spec.pins


def test_rabbitmqctl_in_the_root_prints_its_version(
    built: tuple[RootSpec, Path], erlang_env: dict[str, str]
) -> None:
    spec, root = built
    result = subprocess.run(
        in_root(root, "/usr/lib/rabbitmq/bin/rabbitmqctl", "version"),
        env=erlang_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == EXPECTED[spec.name][1]


def test_the_root_carries_its_own_rabbitmq_not_the_hosts(built: tuple[RootSpec, Path]) -> None:
    spec, root = built
    lib = root / "usr" / "lib" / "rabbitmq"
    assert not lib.is_symlink() and lib.is_dir()
    releases = sorted(p.name for p in (lib / "lib").glob("rabbitmq_server-*"))
    assert releases == [f"rabbitmq_server-{EXPECTED[spec.name][1]}"]
    # Nothing of the host is mounted into it (proc is mounted only during the build).
    assert rootfs.mounts_under(root) == []
    assert (root / "usr/sbin/policy-rc.d").read_text().rstrip().endswith("exit 101")
