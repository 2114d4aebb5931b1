"""Debian root filesystems the local cluster runs RabbitMQ from (the "pod twin", issue #11).

Two RabbitMQ roots, each declared once in :data:`ROOTS`:

* ``rabbitmq-4.3``  Debian sid, rabbitmq-server 4.3.6 on Erlang 29.1.2: what ships
  (image ``rabbitmq:4.3.6-management``);
* ``rabbitmq-3.10`` Debian bookworm, rabbitmq-server 3.10.8: the article's side of
  ``make bench`` (classic mirroring no longer exists in 4.x);

and one for tools (:data:`PROMETHEUS`, Debian bookworm's prometheus 2.42.0: the
``promtool`` the alert rules are tested with), built the same way.

Each is built once with ``debootstrap --variant=minbase`` plus an explicit
``apt-get install rabbitmq-server=<pinned> erlang-base=<pinned>`` and cached
outside the work tree, under ``/var/cache/celery-cluster/rootfs/`` (or
``$CELERY_CLUSTER_ROOTFS_DIR``), one folder per root named with its pinned
rabbitmq-server version, so a version bump builds a new root.  Nothing comes
from the host's own RabbitMQ or Erlang.

A build goes into a temporary sibling directory and is renamed into place only
once complete, with a marker file (:data:`MARKER`, JSON: suite, mirror, pins and
the versions read back from the root's dpkg database).  A root without a valid
marker (half-built, or built for other pins) is removed and rebuilt.  Before
installing, the mirror's versions are checked: if it does not offer a pinned
version the build fails naming the package, the pin and what the mirror offers.
``/proc`` is mounted in the root only for the installation and unmounted on every
exit path (errors, Ctrl-C, SIGTERM); then nothing may be left in ``/proc/mounts``
under the root.  Builds of one root are serialized with a lock file.

Building needs root (debootstrap, chroot, mount) and debootstrap; using a built
root (:func:`ensure_root` on a valid root, :func:`root_path`) does not.

Standard library only: ``tools/bootstrap.py`` runs this under the system python3
before any virtualenv exists.  ``python3 -m localcluster.rootfs [--check]``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = [
    "ALL_ROOTS",
    "CACHE_ENV",
    "DEFAULT_CACHE_DIR",
    "MARKER",
    "MIRROR",
    "MIRROR_ENV",
    "PROMETHEUS",
    "RABBITMQ_3_10",
    "RABBITMQ_4_3",
    "ROOTS",
    "RootSpec",
    "RootfsError",
    "System",
    "cache_dir",
    "ensure_root",
    "find_debootstrap",
    "for_version",
    "mounts_under",
    "problem",
    "read_marker",
    "root_commands",
    "root_path",
    "roots",
]

MIRROR = "http://deb.debian.org/debian"
MIRROR_ENV = "CELERY_CLUSTER_ROOTFS_MIRROR"
DEFAULT_CACHE_DIR = Path("/var/cache/celery-cluster/rootfs")
CACHE_ENV = "CELERY_CLUSTER_ROOTFS_DIR"
VARIANT = "minbase"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
#: The marker file at the top of a complete root.
MARKER = ".celery-cluster-rootfs.json"
MARKER_FORMAT = 1
#: The server's start script inside a root (what the local cluster runs).
SERVER = "usr/lib/rabbitmq/bin/rabbitmq-server"
#: What a root needs on top of its packages, with the Debian images' headroom.
MIN_FREE_BYTES = 1536 * 1024 * 1024
ROOT_COMMANDS = "sudo make setup    (or: sudo python3 -m localcluster.rootfs)"
DEBOOTSTRAP_INSTALL = "apt-get install -y debootstrap"
KEYRING_INSTALL = "apt-get install -y debian-archive-keyring"
#: The environment of every command run inside a root: nothing from the host's
#: environment but the proxy settings apt may need.
CHROOT_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LC_ALL": "C",
    "DEBIAN_FRONTEND": "noninteractive",
}
PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
# The snapshot mirror's Release files are past their Valid-Until; no service may
# start while packages are installed (policy-rc.d exit 101: "action forbidden").
APT_CONF = (
    'Acquire::Check-Valid-Until "false";\n'
    'Acquire::Languages "none";\n'
    'APT::Install-Recommends "false";\n'
)
POLICY_RC_D = "#!/bin/sh\n# celery-cluster rootfs: no service starts in this root.\nexit 101\n"


class RootfsError(RuntimeError):
    """A root filesystem cannot be built or is not valid; the message says what to do."""


@dataclass(frozen=True)
class RootSpec:
    """One root: a Debian suite and the exact package versions installed in it."""

    name: str
    suite: str
    #: (package, exact Debian version) pairs, installed as ``package=version``.
    packages: tuple[tuple[str, str], ...]
    #: What the root is for: its version names the root's folder.
    main_package: str = "rabbitmq-server"
    #: A file a complete root has (relative to the root).
    check_file: str = SERVER

    @property
    def pins(self) -> dict[str, str]:
        return dict(self.packages)

    @property
    def version(self) -> str:
        """The pinned main package's version (Debian), e.g. ``"4.3.6-1"``."""
        return self.pins[self.main_package]

    @property
    def upstream_version(self) -> str:
        """RabbitMQ's own version, e.g. ``"4.3.6"`` (what ``rabbitmqctl version`` prints)."""
        version = self.version.split(":", 1)[-1]
        return version.rsplit("-", 1)[0]

    @property
    def dir_name(self) -> str:
        return f"{self.name}_{self.version}"

    def describe(self) -> str:
        return f"{self.name} (Debian {self.suite}, {self.main_package} {self.version})"


RABBITMQ_4_3 = RootSpec(
    name="rabbitmq-4.3",
    suite="sid",
    packages=(("rabbitmq-server", "4.3.6-1"), ("erlang-base", "1:29.1.2+dfsg-1")),
)
RABBITMQ_3_10 = RootSpec(
    name="rabbitmq-3.10",
    suite="bookworm",
    packages=(
        ("rabbitmq-server", "3.10.8-1.1+deb12u1"),
        ("erlang-base", "1:25.2.3+dfsg-1+deb12u4"),
    ),
)
ROOTS: tuple[RootSpec, ...] = (RABBITMQ_4_3, RABBITMQ_3_10)
#: Prometheus and promtool (Debian's prometheus package), pinned like RabbitMQ: the
#: alert rules are tested with this promtool (tests/unit/test_alert_rules.py).
PROMETHEUS = RootSpec(
    name="prometheus",
    suite="bookworm",
    packages=(("prometheus", "2.42.0+ds-5+deb12u1"),),
    main_package="prometheus",
    check_file="usr/bin/promtool",
)
#: Every root make setup builds: RabbitMQ's, then the tools'.
ALL_ROOTS: tuple[RootSpec, ...] = (*ROOTS, PROMETHEUS)


def roots() -> dict[str, RootSpec]:
    """Every root by name."""
    return {spec.name: spec for spec in ALL_ROOTS}


def promtool() -> Path:
    """Prometheus's promtool, from its root (``make setup`` builds it)."""
    reason = problem(PROMETHEUS)
    if reason is not None:
        raise RootfsError(
            f"promtool comes from the root {PROMETHEUS.describe()} at "
            f"{root_path(PROMETHEUS)}: {reason}. Build it: {ROOT_COMMANDS}"
        )
    return root_path(PROMETHEUS) / PROMETHEUS.check_file


def for_version(version: str) -> RootSpec:
    """The root running RabbitMQ ``major.minor`` of ``version`` (``"4.3"``, ``"3.10.8"``)."""
    wanted = version.split(".")[:2]
    for spec in ROOTS:
        if spec.upstream_version.split(".")[:2] == wanted:
            return spec
    known = ", ".join(spec.upstream_version for spec in ROOTS)
    raise RootfsError(f"no root filesystem runs RabbitMQ {version} (there are: {known})")


def say(message: str) -> None:
    print(f"[rootfs] {message}", flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)


def mirror() -> str:
    return os.environ.get(MIRROR_ENV) or MIRROR


def root_path(spec: RootSpec, cache: Path | None = None) -> Path:
    """Where the root lives (whether or not it is built)."""
    return (cache or cache_dir()) / spec.dir_name


def root_commands() -> str:
    """The command that builds the roots, as root (sudo drops our environment variables)."""
    overrides = " ".join(
        f"{var}={os.environ[var]}" for var in (CACHE_ENV, MIRROR_ENV) if os.environ.get(var)
    )
    if not overrides:
        return ROOT_COMMANDS
    return (
        f"sudo env {overrides} make setup    "
        f"(or: sudo env {overrides} python3 -m localcluster.rootfs)"
    )


def find_debootstrap() -> str | None:
    """The debootstrap command; it lives in /usr/sbin, which a user's PATH may lack."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which("debootstrap", path=path)


def _unescape_mount_field(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as \ooo.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


class System:
    """Everything a build does to the machine; the unit tests substitute a fake."""

    def is_root(self) -> bool:
        return os.geteuid() == 0

    def which(self, name: str) -> str | None:
        return find_debootstrap() if name == "debootstrap" else shutil.which(name)

    def exists(self, path: Path) -> bool:
        return path.exists()

    def free_bytes(self, path: Path) -> int:
        return shutil.disk_usage(path).free

    def mount_points(self) -> list[Path]:
        with open("/proc/mounts", encoding="utf-8", errors="replace") as mounts:
            return [Path(_unescape_mount_field(line.split()[1])) for line in mounts if line.strip()]

    def run(self, args: Sequence[str], *, env: Mapping[str, str] | None = None) -> str:
        """Run a command, return its output (stdout and stderr); RootfsError if it fails."""
        try:
            result = subprocess.run(
                list(args),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                env=dict(env) if env is not None else None,
                check=False,
            )
        except OSError as error:
            raise RootfsError(f"could not run {' '.join(args)}: {error}") from error
        if result.returncode != 0:
            tail = "\n".join(result.stdout.strip().splitlines()[-25:])
            raise RootfsError(
                f"`{' '.join(args)}` failed (exit status {result.returncode}):\n{tail}"
            )
        return result.stdout


def mounts_under(path: Path, system: System | None = None) -> list[Path]:
    """Mount points at or below ``path``, deepest first."""
    base = Path(os.path.realpath(path))
    found = [
        mount
        for mount in (system or System()).mount_points()
        if mount == base or base in mount.parents
    ]
    return sorted(found, key=lambda mount: len(mount.parts), reverse=True)


# -- markers -----------------------------------------------------------------------


def read_marker(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def problem(spec: RootSpec, cache: Path | None = None) -> str | None:
    """Why the root is not usable as it is (None: it is valid)."""
    path = root_path(spec, cache)
    if not path.is_dir():
        return "not built"
    marker = read_marker(path)
    if marker is None:
        return "no valid marker (a half-built root?)"
    expected = {"format": MARKER_FORMAT, "name": spec.name, "suite": spec.suite}
    for key, value in expected.items():
        if marker.get(key) != value:
            return f"marker {key} is {marker.get(key)!r}, expected {value!r}"
    if marker.get("pinned") != spec.pins:
        return f"built for other pins {marker.get('pinned')}, expected {spec.pins}"
    if marker.get("installed") != spec.pins:
        return f"installed versions {marker.get('installed')} differ from the pins {spec.pins}"
    if not (path / spec.check_file).exists():
        return f"no /{spec.check_file} in the root"
    return None


def _marker(spec: RootSpec, mirror_url: str, installed: dict[str, str], seconds: float) -> str:
    data = {
        "format": MARKER_FORMAT,
        "name": spec.name,
        "suite": spec.suite,
        "variant": VARIANT,
        "mirror": mirror_url,
        "pinned": spec.pins,
        "installed": installed,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(seconds, 1),
    }
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


# -- building ----------------------------------------------------------------------


def _elapsed(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM (and SIGHUP) interrupt like Ctrl-C, so every ``finally`` (umount) runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _unmount_all(path: Path, system: System) -> None:
    """Unmount everything at or below ``path``; RootfsError if anything stays mounted."""
    for mount in mounts_under(path, system):
        try:
            system.run(["umount", str(mount)])
        except RootfsError:
            # Busy (a process still running in the root after Ctrl-C): detach it now,
            # the kernel finishes when the last user is gone.
            with contextlib.suppress(RootfsError):
                system.run(["umount", "--lazy", str(mount)])
    left = mounts_under(path, system)
    if left:
        raise RootfsError(
            f"still mounted under {path}: {', '.join(map(str, left))}; "
            f"unmount them (umount --lazy PATH) before removing {path}"
        )


def _remove(path: Path, system: System) -> None:
    """Remove a root (or a half-built one): unmount first, never follow a mount."""
    if not path.exists() and not path.is_symlink():
        return
    _unmount_all(path, system)
    for attempt in range(3):
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            # A process killed by Ctrl-C may still be writing in it for a moment.
            if attempt == 2:
                raise
            time.sleep(0.5)


def _chroot_env() -> dict[str, str]:
    env = dict(CHROOT_ENV)
    env.update({var: os.environ[var] for var in PROXY_VARS if var in os.environ})
    return env


def _in_root(root: Path, *args: str) -> list[str]:
    return ["chroot", str(root), *args]


def _offered(output: str, package: str) -> list[str]:
    """Versions in ``apt-cache madison`` output for one package."""
    versions: list[str] = []
    for line in output.splitlines():
        fields = [field.strip() for field in line.split("|")]
        if len(fields) >= 3 and fields[0] == package and fields[1] not in versions:
            versions.append(fields[1])
    return versions


def _check_build_preconditions(spec: RootSpec, cache: Path, reason: str, system: System) -> str:
    """Root, debootstrap, the keyring: checked before anything is touched."""
    where = root_path(spec, cache)
    if not system.is_root():
        raise RootfsError(
            f"the root filesystem {spec.describe()} at {where} needs building ({reason}); that "
            f"needs root (debootstrap, chroot, mount). Run:\n\n    {root_commands()}\n"
        )
    debootstrap = system.which("debootstrap")
    if debootstrap is None:
        raise RootfsError(
            f"building {spec.describe()} needs debootstrap, which is not installed. "
            f"Run:\n\n    {DEBOOTSTRAP_INSTALL}\n"
        )
    if not system.exists(KEYRING):
        raise RootfsError(
            f"building {spec.describe()} needs Debian's archive keyring ({KEYRING}). "
            f"Run:\n\n    {KEYRING_INSTALL}\n"
        )
    return debootstrap


def _install(spec: RootSpec, tmp: Path, mirror_url: str, system: System) -> dict[str, str]:
    """apt inside the debootstrapped ``tmp``: check the mirror, install the pins, read back."""
    env = _chroot_env()
    apt_conf = tmp / "etc" / "apt" / "apt.conf.d" / "99celery-cluster-rootfs"
    apt_conf.parent.mkdir(parents=True, exist_ok=True)
    apt_conf.write_text(APT_CONF)
    policy = tmp / "usr" / "sbin" / "policy-rc.d"
    policy.parent.mkdir(parents=True, exist_ok=True)
    policy.write_text(POLICY_RC_D)
    policy.chmod(0o755)
    (tmp / "proc").mkdir(exist_ok=True)
    system.run(["mount", "-t", "proc", "proc", str(tmp / "proc")])
    # The caller unmounts everything under tmp in its `finally`, on every exit path.
    system.run(_in_root(tmp, "apt-get", "update", "-qq"), env=env)
    madison = system.run(_in_root(tmp, "apt-cache", "madison", *spec.pins), env=env)
    for package, version in spec.packages:
        offered = _offered(madison, package)
        if version not in offered:
            raise RootfsError(
                f"{spec.name}: the mirror {mirror_url} ({spec.suite}) offers {package} "
                f"{', '.join(offered) if offered else '(no version at all)'}, not the pinned "
                f"{version}. Update the pin in localcluster/rootfs.py (and everything that "
                f"expects {version}) or use a mirror that carries it ({MIRROR_ENV})."
            )
    pinned = [f"{package}={version}" for package, version in spec.packages]
    say(f"{spec.name}: installing {' '.join(pinned)}")
    system.run(
        _in_root(tmp, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *pinned),
        env=env,
    )
    installed = {
        package: system.run(
            _in_root(tmp, "dpkg-query", "-W", "-f", "${Version}", package), env=env
        ).strip()
        for package in spec.pins
    }
    if installed != spec.pins:
        raise RootfsError(f"{spec.name}: installed {installed}, pinned {spec.pins}")
    system.run(_in_root(tmp, "apt-get", "clean"), env=env)
    lists = tmp / "var" / "lib" / "apt" / "lists"
    if lists.is_dir():  # `apt-get update` fetches them again when needed
        for entry in lists.iterdir():
            if entry.is_file() and entry.name != "lock":
                entry.unlink()
    return installed


def _build(spec: RootSpec, cache: Path, mirror_url: str, debootstrap: str, system: System) -> Path:
    final = root_path(spec, cache)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.dir_name}.tmp-", dir=cache))
    tmp.chmod(0o755)  # it becomes the root's "/": every user in it must traverse it
    done = False
    try:
        with _sigterm_raises():
            try:
                say(
                    f"{spec.name}: debootstrap --variant={VARIANT} {spec.suite} from "
                    f"{mirror_url} (1-2 minutes)"
                )
                system.run(
                    [
                        debootstrap,
                        f"--variant={VARIANT}",
                        f"--keyring={KEYRING}",
                        spec.suite,
                        str(tmp),
                        mirror_url,
                    ]
                )
                say(f"{spec.name}: debootstrap done after {_elapsed(time.monotonic() - started)}")
                installed = _install(spec, tmp, mirror_url, system)
            finally:
                _unmount_all(tmp, system)
            seconds = time.monotonic() - started
            (tmp / MARKER).write_text(_marker(spec, mirror_url, installed, seconds))
            os.rename(tmp, final)
            done = True
    finally:
        if not done:
            say(f"{spec.name}: build failed, removing {tmp}")
            _remove(tmp, system)
    say(
        f"{spec.name}: built in {_elapsed(seconds)}: {final} "
        f"({', '.join(f'{p} {v}' for p, v in installed.items())})"
    )
    return final


def ensure_root(
    spec: RootSpec,
    *,
    cache: Path | None = None,
    mirror_url: str | None = None,
    system: System | None = None,
) -> Path:
    """The root's path, built first if it is missing, half-built or built for other pins."""
    cache = cache or cache_dir()
    system = system or System()
    reason = problem(spec, cache)
    if reason is None:
        return root_path(spec, cache)
    debootstrap = _check_build_preconditions(spec, cache, reason, system)
    mirror_url = mirror_url or mirror()
    cache.mkdir(parents=True, exist_ok=True)
    if system.free_bytes(cache) < MIN_FREE_BYTES:
        raise RootfsError(
            f"building {spec.describe()} needs about {MIN_FREE_BYTES >> 20} MB free in {cache}; "
            f"{system.free_bytes(cache) >> 20} MB are"
        )
    with _locked(cache / f".{spec.dir_name}.lock"):
        reason = problem(spec, cache)  # another build may have finished meanwhile
        if reason is None:
            return root_path(spec, cache)
        # Holding the lock: any temporary directory of this root is a dead build's.
        for stale in sorted(cache.glob(f".{spec.dir_name}.tmp-*")):
            say(f"{spec.name}: removing the interrupted build {stale}")
            _remove(stale, system)
        final = root_path(spec, cache)
        if final.exists() or final.is_symlink():
            say(f"{spec.name}: removing {final}: {reason}")
            _remove(final, system)
        say(f"{spec.name}: building {spec.describe()} into {final}")
        return _build(spec, cache, mirror_url, debootstrap, system)


# -- command line ------------------------------------------------------------------


def _summary(spec: RootSpec, cache: Path) -> str:
    path = root_path(spec, cache)
    marker = read_marker(path) or {}
    installed = marker.get("installed", {})
    versions = ", ".join(f"{package} {version}" for package, version in installed.items())
    built = f", built {marker.get('built_at')} in {marker.get('build_seconds')} s"
    return f"{spec.name:<14} {path}  ({spec.suite}: {versions}{built})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m localcluster.rootfs",
        description="Build (once) the Debian root filesystems the local cluster runs "
        f"RabbitMQ from, cached in {cache_dir()} (${CACHE_ENV}).",
    )
    parser.add_argument(
        "--check", action="store_true", help="only verify the roots (exit 1 if one is not valid)"
    )
    args = parser.parse_args(argv)
    cache = cache_dir()
    status = 0
    for spec in ALL_ROOTS:
        if args.check:
            reason = problem(spec, cache)
            if reason is not None:
                print(f"{spec.name:<14} {root_path(spec, cache)}: {reason}", file=sys.stderr)
                status = 1
                continue
        else:
            try:
                ensure_root(spec, cache=cache)
            except RootfsError as error:
                print(f"[rootfs] {error}", file=sys.stderr)
                return 1
            except KeyboardInterrupt:
                print("[rootfs] interrupted", file=sys.stderr)
                return 130
        print(_summary(spec, cache))
    if status:
        print(f"\nBuild them (as root):\n\n    {root_commands()}\n", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
