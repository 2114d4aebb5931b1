"""Enqueue N ``count`` tasks, as the article's scheduler did, and say how it went.

    python -m app.scheduler --tasks 10000 --task-seconds 1 --ids-file ids.txt

Each task id is chosen here and written to ``--ids-file`` only once RabbitMQ
confirmed the publish (``confirm_publish`` + retries, see :mod:`app.settings`),
so the file is exactly the set of tasks the cluster owes us; compare it with a
ledger (:mod:`app.ledger`) to count lost tasks.  Exit status is 1 if any publish
failed (after the whole retry policy), 0 otherwise.
"""

from __future__ import annotations

import io
import sys
import time
import uuid
from typing import IO, Any

import click

MAX_CONSECUTIVE_FAILURES = 10


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--tasks",
    "n_tasks",
    type=click.IntRange(min=0),
    default=10_000,
    show_default=True,
    help="How many count tasks to enqueue.",
)
@click.option(
    "--task-seconds",
    type=click.FloatRange(min=0.0),
    default=1.0,
    show_default=True,
    help="Sleep per counting step (each task counts 0..9, so a task takes 10x this; "
    "the article used 1 s).",
)
@click.option(
    "--ids-file",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Append the id of every confirmed task to this file, one per line.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0.0),
    default=0.0,
    show_default=True,
    help="Publish at most this many tasks per second (0: as fast as confirms allow).",
)
@click.option(
    "--progress/--no-progress",
    default=True,
    show_default=True,
    help="Show a progress bar on stderr.",
)
def main(
    n_tasks: int, task_seconds: float, ids_file: str | None, rate: float, progress: bool
) -> None:
    """Enqueue N count tasks with publisher confirms and report the rate."""
    # Imported here so that --help works without CELERY_BROKER_URLS.
    from app.celery import app
    from app.tasks import count

    published = 0
    failed = 0
    consecutive_failures = 0
    ids_fh: IO[str] | None = open(ids_file, "a", encoding="utf-8") if ids_file else None  # noqa: SIM115
    started = time.monotonic()
    try:
        with (
            app.producer_or_acquire() as producer,
            click.progressbar(
                range(n_tasks),
                label="publishing",
                file=sys.stderr if progress else io.StringIO(),
                show_pos=True,
            ) as bar,
        ):
            for i in bar:
                if rate > 0:
                    # Pace against the start time, so slow publishes are caught up.
                    ahead = started + i / rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
                task_id = str(uuid.uuid4())
                try:
                    count.apply_async(
                        kwargs={"step_seconds": task_seconds},
                        task_id=task_id,
                        producer=producer,
                    )
                except Exception as exc:  # report it and keep counting
                    failed += 1
                    consecutive_failures += 1
                    click.echo(f"\npublish of {task_id} failed: {exc!r}", err=True)
                    if consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
                        click.echo(
                            f"giving up after {consecutive_failures} consecutive failures",
                            err=True,
                        )
                        break
                    continue
                consecutive_failures = 0
                published += 1
                if ids_fh is not None:
                    ids_fh.write(task_id + "\n")
                    ids_fh.flush()
    finally:
        if ids_fh is not None:
            ids_fh.close()
    elapsed = time.monotonic() - started
    rate = published / elapsed if elapsed > 0 else 0.0
    not_attempted = n_tasks - published - failed
    click.echo(
        f"published={published} failed={failed} not_attempted={not_attempted} "
        f"elapsed={elapsed:.2f}s rate={rate:.1f} tasks/s"
    )
    if failed or not_attempted:
        sys.exit(1)


def _main(argv: Any = None) -> None:
    main(args=argv, prog_name="python -m app.scheduler")


if __name__ == "__main__":
    _main()
