"""One producer, N ``count`` tasks, timed: ``python -m bench.publish --config article|ours``.

The same loop for both configurations (the loop of ``app.scheduler``: one
producer from the app's pool, ``count.apply_async(..., producer=producer)``), so
only the Celery configuration differs:

* ``ours``: ``app.celery`` (``celery_config(WorkerSettings.from_env())``, publisher
  confirms, and a publish retried for the publish retry budget by
  ``app.publish.BudgetedTask``; a call returns once RabbitMQ confirmed);
* ``article``: ``bench.article_app`` (Celery's defaults; a call returns once the
  message is written to the socket).

``--confirms on|off`` overrides the configuration's publisher confirms, and
nothing else, to measure what they cost.

A task id is appended to ``--ids-file`` only after its ``apply_async`` returned
without an exception: what the producer believes it published.  The timing goes
to ``--result-file`` as JSON (wall-clock ``time.time()`` of the first and last
publish, so it lines up with the ledger).  Broker URLs, queue and rotation come
from the environment, as for the workers: ``bench.run`` runs this as a pod of the
worker Deployment's template, with its env (and ``CELERY_BROKER_ROTATION=0``).
Exit status 0 even if some publishes failed: the counts say so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path
from typing import IO, Any

from app.scheduler import pace

MAX_CONSECUTIVE_FAILURES = 50


def _task(config: str) -> Any:
    if config == "article":
        from bench.article_app import count
    else:
        from app.tasks import count
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.publish")
    parser.add_argument("--config", choices=("article", "ours"), required=True)
    parser.add_argument("--tasks", type=int, required=True)
    parser.add_argument("--task-seconds", type=float, default=0.0, help="sleep per count step")
    parser.add_argument("--rate", type=float, default=0.0, help="tasks/s, 0 = as fast as it can")
    parser.add_argument(
        "--confirms",
        choices=("as-configured", "on", "off"),
        default="as-configured",
        help="override the configuration's publisher confirms (to see what they cost)",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=1,
        help="ours: publishes unconfirmed at once (app.pipeline); 1: a confirm per publish",
    )
    parser.add_argument("--ids-file", type=Path, required=True)
    parser.add_argument("--result-file", type=Path, required=True)
    args = parser.parse_args(argv)

    count = _task(args.config)
    app = count.app
    if args.confirms != "as-configured":  # before the first connection is made
        options = dict(app.conf.broker_transport_options or {})
        options["confirm_publish"] = args.confirms == "on"
        app.conf.broker_transport_options = options
    confirms = bool((app.conf.broker_transport_options or {}).get("confirm_publish", False))
    if args.window > 1 and not confirms:
        parser.error("--window > 1 needs publisher confirms")
    tally = _Tally()
    with args.ids_file.open("a", encoding="utf-8") as ids:
        if args.window > 1:
            extra = _pipelined(args, count, tally, ids)
        else:
            extra = _one_at_a_time(args, count, tally, ids)
    result = {
        "config": args.config,
        "confirm_publish": confirms,
        "window": args.window,
        "requested": args.tasks,
        **tally.summary(),
        **extra,
    }
    args.result_file.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "errors"}), flush=True)
    return 0


class _Tally:
    """What a publish loop counts: ids published (written as they are), failures, the
    wall-clock first/last publish (to line up with the ledger) and the loop's own CPU."""

    def __init__(self) -> None:
        self.published = self.failed = 0
        self.errors: list[str] = []
        self.first: float | None = None
        self.last: float | None = None
        self.started = self.ended = 0.0
        self._cpu_started = self.cpu_s = 0.0

    def start(self) -> None:
        self.started, self._cpu_started = time.time(), time.process_time()

    def stop(self) -> None:
        self.ended, self.cpu_s = time.time(), time.process_time() - self._cpu_started

    def done(self, task_id: str, ids: IO[str]) -> None:
        self.published += 1
        now = time.time()
        self.first = now if self.first is None else self.first
        self.last = now
        ids.write(task_id + "\n")

    def error(self, task_id: str, exc: BaseException) -> None:
        self.failed += 1
        if len(self.errors) < 5:
            self.errors.append(f"{task_id}: {exc!r}")

    def summary(self) -> dict[str, Any]:
        elapsed = self.ended - self.started
        return {
            "published": self.published,
            "failed": self.failed,
            "errors": self.errors,
            "started": self.started,
            "first": self.first,
            "last": self.last,
            "ended": self.ended,
            "elapsed_s": elapsed,
            "cpu_s": self.cpu_s,  # this process's own CPU time in the loop: the publisher's cost
            "rate": self.published / elapsed if elapsed > 0 else None,
        }


def _one_at_a_time(args: argparse.Namespace, count: Any, tally: _Tally, ids: IO[str]) -> dict:
    """``apply_async`` per task (ours: :class:`app.publish.BudgetedTask`, a confirm each)."""
    from app.publish import PublishBudgetExceeded

    consecutive = 0
    close_error: str | None = None
    with count.app.producer_or_acquire() as producer:
        # Connect (and declare) before the clock starts: the rate is the loop's.
        producer.connection.ensure_connection(max_retries=3)
        tally.start()
        t0 = time.monotonic()
        for i in range(args.tasks):
            pace(t0, i, args.rate)
            task_id = str(uuid.uuid4())
            try:
                count.apply_async(
                    kwargs={"step_seconds": args.task_seconds}, task_id=task_id, producer=producer
                )
            except PublishBudgetExceeded as exc:  # ours: no node for the whole budget
                tally.error(task_id, exc)
                break
            except Exception as exc:  # count it and go on, as a real scheduler would
                tally.error(task_id, exc)
                consecutive += 1
                if consecutive >= MAX_CONSECUTIVE_FAILURES:
                    break
                continue
            consecutive = 0
            tally.done(task_id, ids)
            ids.flush()
        tally.stop()
        # Close with AMQP's handshake: RabbitMQ answers close-ok only once it has
        # processed every frame sent before, so no publish (an unconfirmed one
        # included) is left in this process's socket buffer when it exits and the
        # bench removes its pod's network. Seen without it: the last 185 of 5,000
        # unconfirmed publishes never reached the queue.
        try:
            producer.connection.close()
        except Exception as exc:  # a connection the broker already dropped: recorded
            close_error = repr(exc)
    return {"close_error": close_error}


def _pipelined(args: argparse.Namespace, count: Any, tally: _Tally, ids: IO[str]) -> dict:
    """``--window`` > 1: :class:`app.pipeline.ConfirmedPipeline`; an id is written (and
    counted published) once its confirm arrived."""
    from app.pipeline import ConfirmedPipeline
    from app.publish import PublishBudgetExceeded
    from app.settings import WorkerSettings

    budget = WorkerSettings.from_env().publish_retry_seconds
    pipeline = ConfirmedPipeline(
        count.app,
        window=args.window,
        budget=budget,
        on_confirm=lambda task_id: tally.done(task_id, ids),
    )
    tally.start()
    t0 = time.monotonic()
    try:
        for i in range(args.tasks):
            pace(t0, i, args.rate)
            pipeline.submit(count, str(uuid.uuid4()), kwargs={"step_seconds": args.task_seconds})
        pipeline.flush()
    except PublishBudgetExceeded as exc:
        tally.error(exc.task_id, exc)
    tally.stop()
    tally.failed = args.tasks - tally.published
    # Closed with AMQP's handshake (see _one_at_a_time): nothing left in the socket.
    pipeline.close()
    return {"republished": pipeline.republished, "close_error": None}


if __name__ == "__main__":
    sys.exit(main())
