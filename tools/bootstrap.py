#!/usr/bin/env python3
"""Set up a checkout on a fresh Debian/Ubuntu machine: virtualenvs, locked packages, RabbitMQ.

Standard library only: it runs before the virtualenv exists. Idempotent and
quick when nothing changed (each lock file's hash is stamped into its venv).

Three virtualenvs, because their locked dependencies conflict:

* ``.venv``         the program, its tests and the tools (requirements-dev.txt);
* ``.venv-policy``  the Pulumi policy pack (policy/requirements.txt: pulumi-policy
  needs protobuf < 5.30, the program's pulumi is locked with protobuf 6);
* ``.venv-scan``    the checkov security scan (requirements-scan.txt: checkov pins
  packaging < 24, pulumi needs >= 26).

And, unless ``--no-rabbitmq``, the Debian root filesystems the local cluster runs
RabbitMQ from, and the one promtool (the alert rules' tests) comes from
(``localcluster/rootfs.py``: built once with debootstrap as root, cached outside the
work tree; a few minutes the first time).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# `python3 tools/bootstrap.py` puts tools/ first on sys.path, not the repository.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from localcluster import rootfs  # noqa: E402  (standard library only)

VENV = ROOT / ".venv"
LOCK = ROOT / "requirements-dev.txt"
# (virtualenv, its lock file); the first is the main one and holds uv.
VENVS = (
    (VENV, LOCK),
    (ROOT / ".venv-policy", ROOT / "policy" / "requirements.txt"),
    (ROOT / ".venv-scan", ROOT / "requirements-scan.txt"),
)
# uv installs the hash-locked set in seconds; pinned like everything else.
UV_VERSION = "0.13.9"
# The partition and machine-loss faults cut a pod's network with nftables rules in its
# network namespace (localcluster/partition.py): root and the `nft` command.
NFT_INSTALL = "apt-get install -y --no-install-recommends nftables"


def say(message: str) -> None:
    print(f"[bootstrap] {message}", flush=True)


def run(*args: str | os.PathLike[str], env: dict[str, str] | None = None) -> None:
    subprocess.run([str(a) for a in args], check=True, env=env)


def ensure_python() -> None:
    # Runs under the system python3, which may be older than the project's floor.
    if sys.version_info < (3, 11):  # noqa: UP036
        sys.exit(
            f"[bootstrap] Python >= 3.11 is needed, this is {sys.version.split()[0]}: "
            "install python3 (3.11 or newer) and python3-venv"
        )


def ensure_venv(path: Path = VENV, *, with_pip: bool = True) -> Path:
    python = path / "bin" / "python"
    if not python.exists():
        say(f"creating the virtualenv {path}")
        try:
            venv.EnvBuilder(with_pip=with_pip).create(path)
        except subprocess.CalledProcessError:
            sys.exit("[bootstrap] could not create a virtualenv: apt-get install -y python3-venv")
    return python


def ensure_packages(python: Path, lock: Path = LOCK) -> None:
    """`uv pip sync` the lock into the venv of `python`, unless its hash is stamped there."""
    venv_dir = python.parent.parent
    stamp = venv_dir / f".{lock.stem}.sha256"
    digest = hashlib.sha256(lock.read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    uv = VENV / "bin" / "uv"
    if not uv.exists():
        say(f"installing uv {UV_VERSION}")
        run(VENV / "bin" / "python", "-m", "pip", "install", "--quiet", f"uv=={UV_VERSION}")
    say(f"installing the locked packages from {lock.relative_to(ROOT)} into {venv_dir.name}")
    run(uv, "pip", "sync", "--quiet", "--python", python, lock)
    stamp.write_text(digest)


def ensure_nftables() -> None:
    """`nft` for the network faults; only root can use it, so only root installs it."""
    if shutil.which("nft") is not None:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        say(f"no 'nft': the partition and machine-loss faults need it; as root: {NFT_INSTALL}")
        return
    say("installing nftables from the OS packages (the partition and machine-loss faults)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "RUNLEVEL": "1"}
    run("apt-get", "update", "-qq", env=env)
    run(*NFT_INSTALL.split(), "-qq", env=env)


def ensure_debootstrap() -> None:
    """debootstrap (and Debian's archive keyring) for the root filesystems; root only."""
    missing = []
    if rootfs.find_debootstrap() is None:
        missing.append("debootstrap")
    if not rootfs.KEYRING.exists():
        missing.append("debian-archive-keyring")
    if not missing or shutil.which("apt-get") is None:
        return  # rootfs.ensure_root says what is missing and how to install it
    say(f"installing {' '.join(missing)} from the OS packages (the RabbitMQ root filesystems)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run("apt-get", "update", "-qq", env=env)
    run("apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing, env=env)


def ensure_rootfs() -> None:
    """The Debian roots RabbitMQ runs from: checked quickly, built (as root) when missing."""
    missing = [spec for spec in rootfs.ALL_ROOTS if rootfs.problem(spec) is not None]
    if not missing:
        return
    if os.geteuid() != 0:
        described = "\n".join(
            f"    {spec.describe()}: {rootfs.problem(spec)} ({rootfs.root_path(spec)})"
            for spec in missing
        )
        sys.exit(
            "[bootstrap] the local cluster runs RabbitMQ from Debian root filesystems, built "
            f"once with debootstrap as root:\n{described}\nRun:\n\n    {rootfs.root_commands()}\n"
        )
    ensure_debootstrap()
    for spec in missing:
        try:
            rootfs.ensure_root(spec)
        except rootfs.RootfsError as error:
            sys.exit(f"[bootstrap] {error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--no-rabbitmq", action="store_true", help="skip RabbitMQ (cloud commands do not need it)"
    )
    args = parser.parse_args()
    ensure_python()
    for path, lock in VENVS:
        # Only the main venv needs pip (to install uv); uv installs the others.
        ensure_packages(ensure_venv(path, with_pip=path == VENV), lock)
    if not args.no_rabbitmq:
        ensure_nftables()
        ensure_rootfs()


if __name__ == "__main__":
    main()
