"""The article's ``count`` task, instrumented so duplicates are visible.

Delivery is at-least-once (see :mod:`app.settings`): ``count`` is idempotent
(it only counts), and every execution records its task id - a log line always,
and start/finish lines in the ledger file named by ``TASK_LEDGER`` if set.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

from app.celery import app
from app.ledger import FINISH, START, append_record
from app.settings import ENV_LEDGER, ENV_STEP_SECONDS

logger = logging.getLogger(__name__)

STEPS = 10
DEFAULT_STEP_SECONDS = 1.0  # the article: print 0..9, one second apart


def default_step_seconds(environ: Any = None) -> float:
    env = os.environ if environ is None else environ
    raw = env.get(ENV_STEP_SECONDS, "").strip()
    if not raw:
        return DEFAULT_STEP_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0.0 or value == float("inf"):
        raise ValueError(
            f"{ENV_STEP_SECONDS}={raw!r} is invalid: expected a non-negative number of seconds"
        )
    return value


def _record(event: str, task_id: str, worker: str, redelivered: object, **extra: Any) -> None:
    ledger = os.environ.get(ENV_LEDGER)
    if not ledger:
        return
    append_record(
        ledger,
        {
            "event": event,
            "task_id": task_id,
            "worker": worker,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "ts": time.time(),
            "redelivered": redelivered,
            **extra,
        },
    )


@app.task(bind=True, name="app.tasks.count")
def count(self: Any, step_seconds: float | None = None) -> int:
    """Count 0..9, sleeping ``step_seconds`` (default 1 s) per step."""
    delay = default_step_seconds() if step_seconds is None else float(step_seconds)
    if delay < 0:
        raise ValueError(f"step_seconds must be >= 0, got {step_seconds!r}")
    task_id = self.request.id
    worker = self.request.hostname or "?"
    redelivered = (self.request.delivery_info or {}).get("redelivered")
    started = time.time()
    logger.info(
        "count[%s] start worker=%s pid=%s redelivered=%s", task_id, worker, os.getpid(), redelivered
    )
    _record(START, task_id, worker, redelivered)
    for i in range(STEPS):
        logger.debug("count[%s] %d", task_id, i)
        time.sleep(delay)
    _record(FINISH, task_id, worker, redelivered, started=started)
    logger.info(
        "count[%s] finish worker=%s pid=%s in %.3fs",
        task_id,
        worker,
        os.getpid(),
        time.time() - started,
    )
    return STEPS
