"""Enqueue N ``count`` tasks, as the article's scheduler did, and say how it went.

    python -m app.scheduler --tasks 10000 --task-seconds 1 --ids-file ids.txt

Each task id is chosen here and written to ``--ids-file`` only once RabbitMQ
confirmed the publish (``confirm_publish``), so the file is exactly the set of
tasks the cluster owes us; compare it with a ledger (:mod:`app.ledger`) to count
lost tasks.

A publish that no node takes is retried for the publish retry budget
(``CELERY_PUBLISH_RETRY_SECONDS``, default 120 s, :mod:`app.settings`; one log
line per attempt on stderr: the node, how long it has been retrying).  When the
budget runs out the scheduler stops: it says so, lists every task id it did not
get confirmed (on stderr, or in ``--unconfirmed-file``) and exits 1; ``--publish-ids``
on that list publishes exactly the rest.  Exit status: 0 if every task was
confirmed, 1 if not, 2 for a bad option or environment value (one line, no
traceback).
"""

from __future__ import annotations

import io
import logging
import sys
import time
import uuid
from pathlib import Path
from typing import IO, Any

import click

MAX_CONSECUTIVE_FAILURES = 10
PROG = "python -m app.scheduler"


def _read_ids(path: str) -> list[str]:
    ids = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [i for i in ids if i]


def _report_unconfirmed(unconfirmed: list[str], unconfirmed_file: str | None) -> None:
    """Name every task id that was not confirmed, so a re-run publishes exactly those."""
    if not unconfirmed:
        return
    if unconfirmed_file is not None:
        Path(unconfirmed_file).write_text("".join(i + "\n" for i in unconfirmed), encoding="utf-8")
        click.echo(
            f"{len(unconfirmed)} task ids not confirmed, listed in {unconfirmed_file}; "
            f"publish exactly those with: {PROG} --publish-ids {unconfirmed_file}",
            err=True,
        )
        return
    click.echo(
        f"{len(unconfirmed)} task ids not confirmed (publish exactly those with "
        f"{PROG} --publish-ids FILE, one id per line):",
        err=True,
    )
    for task_id in unconfirmed:
        click.echo(f"unconfirmed {task_id}", err=True)


def pace(started: float, i: int, rate: float) -> None:
    """Publish at most ``rate`` a second, paced against the start time, so that slow
    publishes are caught up."""
    if rate > 0:
        ahead = started + i / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)


def _progress(task_ids: list[str], progress: bool) -> Any:
    return click.progressbar(
        task_ids,
        label="publishing",
        file=sys.stderr if progress else io.StringIO(),
        show_pos=True,
    )


def _say_gave_up(exc: Any, settings: Any) -> None:
    from app.settings import ENV_PUBLISH_RETRY_SECONDS

    click.echo(
        f"\ngiving up: no RabbitMQ node took a publish for {exc.elapsed:.1f} s "
        f"({exc.attempts} attempts; the budget is {exc.budget:g} s, "
        f"{ENV_PUBLISH_RETRY_SECONDS}={settings.publish_retry_seconds:g}); "
        f"last error: {exc.last!r}",
        err=True,
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--tasks",
    "n_tasks",
    type=click.IntRange(min=0),
    default=10_000,
    show_default=True,
    help="How many count tasks to enqueue (new task ids).",
)
@click.option(
    "--publish-ids",
    type=click.Path(exists=True, dir_okay=False, readable=True),
    default=None,
    help="Publish exactly these task ids (one per line), e.g. the --unconfirmed-file "
    "of a run that gave up, instead of --tasks new ones.",
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
    "--unconfirmed-file",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="If not every task was confirmed, write the ids that were not to this file "
    "(default: list them on stderr).",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0.0),
    default=0.0,
    show_default=True,
    help="Publish at most this many tasks per second (0: as fast as confirms allow).",
)
@click.option(
    "--window",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Publishes unconfirmed at once (app.pipeline): 1 waits for each confirm before "
    "the next publish; more pipelines them, each id still written only once confirmed.",
)
@click.option(
    "--progress/--no-progress",
    default=True,
    show_default=True,
    help="Show a progress bar on stderr.",
)
@click.pass_context
def main(
    ctx: click.Context,
    n_tasks: int,
    publish_ids: str | None,
    task_seconds: float,
    ids_file: str | None,
    unconfirmed_file: str | None,
    rate: float,
    window: int,
    progress: bool,
) -> None:
    """Enqueue N count tasks with publisher confirms and report the rate."""
    from app.settings import settings_or_exit

    if publish_ids is not None:
        if ctx.get_parameter_source("n_tasks") is not click.core.ParameterSource.DEFAULT:
            raise click.UsageError("--tasks and --publish-ids exclude each other")
        task_ids = _read_ids(publish_ids)
    else:
        task_ids = [str(uuid.uuid4()) for _ in range(n_tasks)]
    n_tasks = len(task_ids)
    # A bad environment value: one line and exit 2, before anything starts.
    settings = settings_or_exit(PROG)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Imported here so that --help works without CELERY_BROKER_URLS.
    from app.celery import app
    from app.publish import PublishBudgetExceeded
    from app.tasks import count

    if window > 1:
        _publish_pipelined(
            app,
            count,
            task_ids,
            task_seconds,
            ids_file,
            unconfirmed_file,
            rate,
            window,
            progress,
            settings,
        )
        return
    published = 0
    failed: list[str] = []
    consecutive_failures = 0
    stopped_at = n_tasks  # index of the first task not attempted
    ids_fh: IO[str] | None = open(ids_file, "a", encoding="utf-8") if ids_file else None  # noqa: SIM115
    started = time.monotonic()
    try:
        with app.producer_or_acquire() as producer, _progress(task_ids, progress) as bar:
            for i, task_id in enumerate(bar):
                pace(started, i, rate)
                try:
                    count.apply_async(
                        kwargs={"step_seconds": task_seconds},
                        task_id=task_id,
                        producer=producer,
                    )
                except PublishBudgetExceeded as exc:
                    # No node took a publish for the whole budget: the cluster is
                    # gone, the next publishes would wait as long again.
                    failed.append(task_id)
                    stopped_at = i + 1
                    _say_gave_up(exc, settings)
                    break
                except Exception as exc:  # report it and keep counting
                    failed.append(task_id)
                    consecutive_failures += 1
                    click.echo(f"\npublish of {task_id} failed: {exc!r}", err=True)
                    if consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
                        stopped_at = i + 1
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
    not_attempted = task_ids[stopped_at:]
    _report_unconfirmed(failed + not_attempted, unconfirmed_file)
    click.echo(
        f"published={published} failed={len(failed)} not_attempted={len(not_attempted)} "
        f"elapsed={elapsed:.2f}s rate={rate:.1f} tasks/s"
    )
    if failed or not_attempted:
        sys.exit(1)


def _publish_pipelined(
    app: Any,
    task: Any,
    task_ids: list[str],
    task_seconds: float,
    ids_file: str | None,
    unconfirmed_file: str | None,
    rate: float,
    window: int,
    progress: bool,
    settings: Any,
) -> None:
    """``--window`` > 1: the same tasks and report, through the confirmed pipeline."""
    from app.pipeline import ConfirmedPipeline
    from app.publish import PublishBudgetExceeded

    confirmed: set[str] = set()
    ids_fh: IO[str] | None = open(ids_file, "a", encoding="utf-8") if ids_file else None  # noqa: SIM115

    def on_confirm(task_id: str) -> None:
        confirmed.add(task_id)
        if ids_fh is not None:
            ids_fh.write(task_id + "\n")
            ids_fh.flush()  # read live (make local follows the confirms)

    submitted = 0
    started = time.monotonic()
    pipeline: ConfirmedPipeline | None = None
    try:
        pipeline = ConfirmedPipeline(
            app, window=window, budget=settings.publish_retry_seconds, on_confirm=on_confirm
        )
        with _progress(task_ids, progress) as bar:
            for i, task_id in enumerate(bar):
                pace(started, i, rate)
                submitted += 1  # attempted, from here on: confirmed or listed
                pipeline.submit(task, task_id, kwargs={"step_seconds": task_seconds})
        pipeline.flush()
    except PublishBudgetExceeded as exc:
        _say_gave_up(exc, settings)
    finally:
        if pipeline is not None:
            pipeline.close()
        if ids_fh is not None:
            ids_fh.close()
    elapsed = time.monotonic() - started
    unconfirmed = [t for t in task_ids[:submitted] if t not in confirmed]
    not_attempted = task_ids[submitted:]
    _report_unconfirmed(unconfirmed + not_attempted, unconfirmed_file)
    click.echo(
        f"published={len(confirmed)} failed={len(unconfirmed)} "
        f"not_attempted={len(not_attempted)} elapsed={elapsed:.2f}s "
        f"rate={len(confirmed) / elapsed if elapsed > 0 else 0.0:.1f} tasks/s "
        f"window={window} republished={pipeline.republished if pipeline else 0} "
        f"reconnects={pipeline.reconnects if pipeline else 0}"
    )
    if unconfirmed or not_attempted:
        sys.exit(1)


def _main(argv: Any = None) -> None:
    main(args=argv, prog_name="python -m app.scheduler")


if __name__ == "__main__":
    _main()
