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
from typing import Any

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

    from app.publish import PublishBudgetExceeded

    count = _task(args.config)
    app = count.app
    if args.confirms != "as-configured":  # before the first connection is made
        options = dict(app.conf.broker_transport_options or {})
        options["confirm_publish"] = args.confirms == "on"
        app.conf.broker_transport_options = options
    confirms = bool((app.conf.broker_transport_options or {}).get("confirm_publish", False))
    published = failed = consecutive = 0
    errors: list[str] = []
    first = last = None
    close_error: str | None = None
    t0 = time.monotonic()
    if args.window > 1:
        if not confirms:
            parser.error("--window > 1 needs publisher confirms")
        return _pipelined(args, count)
    with args.ids_file.open("a", encoding="utf-8") as ids, app.producer_or_acquire() as producer:
        # Connect (and declare) before the clock starts: the rate is the loop's.
        producer.connection.ensure_connection(max_retries=3)
        started, cpu_started = time.time(), time.process_time()
        for i in range(args.tasks):
            if args.rate > 0:
                ahead = t0 + i / args.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            task_id = str(uuid.uuid4())
            try:
                count.apply_async(
                    kwargs={"step_seconds": args.task_seconds}, task_id=task_id, producer=producer
                )
            except PublishBudgetExceeded as exc:  # ours: no node for the whole budget
                failed += 1
                errors.append(f"{task_id}: {exc!r}")
                break
            except Exception as exc:  # count it and go on, as a real scheduler would
                failed += 1
                consecutive += 1
                if len(errors) < 5:
                    errors.append(f"{task_id}: {exc!r}")
                if consecutive >= MAX_CONSECUTIVE_FAILURES:
                    break
                continue
            consecutive = 0
            published += 1
            now = time.time()
            first = now if first is None else first
            last = now
            ids.write(task_id + "\n")
            ids.flush()
        ended, cpu_s = time.time(), time.process_time() - cpu_started
        # Close with AMQP's handshake: RabbitMQ answers close-ok only once it has
        # processed every frame sent before, so no publish (an unconfirmed one
        # included) is left in this process's socket buffer when it exits and the
        # bench removes its pod's network. Seen without it: the last 185 of 5,000
        # unconfirmed publishes never reached the queue.
        try:
            producer.connection.close()
        except Exception as exc:  # a connection the broker already dropped: recorded
            close_error = repr(exc)
    elapsed = ended - started
    result = {
        "config": args.config,
        "confirm_publish": confirms,
        "requested": args.tasks,
        "published": published,
        "failed": failed,
        "errors": errors,
        "started": started,
        "first": first,
        "last": last,
        "ended": ended,
        "elapsed_s": elapsed,
        "cpu_s": cpu_s,  # this process's own CPU time in the loop (the publisher's cost)
        "rate": published / elapsed if elapsed > 0 else None,
        "close_error": close_error,
    }
    args.result_file.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "errors"}), flush=True)
    return 0


def _pipelined(args: argparse.Namespace, count: Any) -> int:
    """``--window`` > 1: the same loop through :class:`app.pipeline.ConfirmedPipeline`; an
    id is written once its confirm arrived, ``published`` counts confirms."""
    from app.pipeline import ConfirmedPipeline
    from app.publish import PublishBudgetExceeded
    from app.settings import WorkerSettings

    confirmed = 0
    errors: list[str] = []
    first = last = None
    t0 = time.monotonic()
    with args.ids_file.open("a", encoding="utf-8") as ids:

        def on_confirm(task_id: str) -> None:
            nonlocal confirmed, first, last
            confirmed += 1
            now = time.time()
            first = now if first is None else first
            last = now
            ids.write(task_id + "\n")

        budget = WorkerSettings.from_env().publish_retry_seconds
        pipeline = ConfirmedPipeline(
            count.app, window=args.window, budget=budget, on_confirm=on_confirm
        )
        started, cpu_started = time.time(), time.process_time()
        try:
            for i in range(args.tasks):
                if args.rate > 0:
                    ahead = t0 + i / args.rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
                pipeline.submit(
                    count, str(uuid.uuid4()), kwargs={"step_seconds": args.task_seconds}
                )
            pipeline.flush()
        except PublishBudgetExceeded as exc:
            errors.append(repr(exc))
        ended, cpu_s = time.time(), time.process_time() - cpu_started
        # Closed with AMQP's handshake (see the loop above): nothing left in the socket.
        pipeline.close()
    elapsed = ended - started
    result = {
        "config": args.config,
        "confirm_publish": True,
        "window": args.window,
        "requested": args.tasks,
        "published": confirmed,
        "failed": args.tasks - confirmed,
        "errors": errors,
        "republished": pipeline.republished,
        "started": started,
        "first": first,
        "last": last,
        "ended": ended,
        "elapsed_s": elapsed,
        "cpu_s": cpu_s,
        "rate": confirmed / elapsed if elapsed > 0 else None,
        "close_error": None,
    }
    args.result_file.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "errors"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
