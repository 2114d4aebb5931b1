"""Liveness of a worker without asking the broker: a heartbeat file.

The worker (``LivenessHeartbeat`` and ``ClusterConsumer`` in
:mod:`app.bootsteps`) touches a file every few seconds from its consumer's event
loop, and every second while it retries a broker connection.  Kubernetes' liveness probe runs

    python -m app.liveness --max-age 60

which fails only if the file is older than that: the consumer loop is wedged.
It never talks to RabbitMQ, so a broker failover - or an outage, during which
the worker is busy reconnecting - does not get healthy workers restarted.

``CELERY_LIVENESS_FILE`` names the file (default ``/tmp/celery-worker-alive``;
``/tmp`` is a writable emptyDir under a read-only root filesystem).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import click

ENV_LIVENESS_FILE = "CELERY_LIVENESS_FILE"
DEFAULT_LIVENESS_FILE = "/tmp/celery-worker-alive"
TOUCH_INTERVAL_SECONDS = 5.0


def liveness_file(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env.get(ENV_LIVENESS_FILE, "").strip() or DEFAULT_LIVENESS_FILE)


def touch(path: Path | None = None) -> None:
    """Mark the worker alive now.  Never raises: a full /tmp must not kill tasks."""
    target = liveness_file() if path is None else path
    try:
        target.touch()
        os.utime(target)
    except OSError:
        pass


def age_seconds(path: Path, now: float | None = None) -> float | None:
    """Seconds since the last touch, None if the file does not exist."""
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    return (time.time() if now is None else now) - mtime


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--max-age",
    type=click.FloatRange(min=0.0, min_open=True),
    default=60.0,
    show_default=True,
    help="Fail if the heartbeat file is older than this many seconds.",
)
@click.option(
    "--file",
    "path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=f"Heartbeat file (default: ${ENV_LIVENESS_FILE} or {DEFAULT_LIVENESS_FILE}).",
)
def main(max_age: float, path: Path | None) -> None:
    """Exit 0 if the worker's heartbeat file is fresh, 1 otherwise."""
    target = liveness_file() if path is None else path
    age = age_seconds(target)
    if age is None:
        click.echo(f"not alive: {target} does not exist (consumer never started)", err=True)
        sys.exit(1)
    if age > max_age:
        click.echo(f"not alive: {target} is {age:.0f} s old (max {max_age:g} s)", err=True)
        sys.exit(1)
    click.echo(f"alive: {target} touched {age:.1f} s ago")


if __name__ == "__main__":
    main(prog_name="python -m app.liveness")
