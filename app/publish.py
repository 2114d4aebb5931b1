"""Publishing that outlasts a broker outage: the publish retry budget, enforced.

Every task of :mod:`app.celery` is a :class:`BudgetedTask`, so every publisher we
ship - ``python -m app.scheduler``, ``bench.publish``, a task that publishes
another (``apply_async``, ``delay``, a signature's ``apply_async``) - keeps
retrying a publish for ``WorkerSettings.publish_retry_seconds`` (default
:data:`app.settings.DEFAULT_PUBLISH_RETRY_SECONDS`, ``CELERY_PUBLISH_RETRY_SECONDS``)
while no node takes it, logging every failed attempt with the node it went
through, the node it tries next and how long it has been retrying; then it raises
:class:`PublishBudgetExceeded`.  (``app.send_task`` by name bypasses the task
class: do not use it for tasks that must not be lost.)

Why not just Celery's ``task_publish_retry_policy``: kombu's
``Producer.publish(retry=True)`` wraps the publish in ``Connection.ensure()``, but
a producer whose connection is not (or no longer) established gets its channel
from ``Connection.default_channel``, which retries the connection with
``timeout=connect_timeout`` (``broker_connection_timeout``, 4 s) as the TOTAL time
and raises ``OperationalError``, which ``ensure()`` does not catch: the publish
failed after ~6 s whatever ``max_retries`` said.  So Celery's policy is set to
a single attempt (``max_retries`` 0: one connection attempt, one publish), and
the failover over the node list, the back-off and the time budget are here,
where every attempt can be logged with its node.

A publish retried after its confirm was lost may be delivered twice (with the
same task id): delivery is at-least-once (:mod:`app.settings`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from amqp.exceptions import MessageNacked, RecoverableChannelError, RecoverableConnectionError
from celery import Task
from celery.utils import uuid
from kombu.exceptions import OperationalError

from app.settings import (
    DEFAULT_PUBLISH_RETRY_SECONDS,
    PUBLISH_CONFIRM_TIMEOUT_SECONDS,
    PUBLISH_RETRY_INTERVAL_MAX,
    PUBLISH_RETRY_INTERVAL_START,
    PUBLISH_RETRY_INTERVAL_STEP,
    sanitize_url,
)

logger = logging.getLogger(__name__)

#: What a publish raises when no node took it (after kombu's own pass over the
#: nodes): kombu's library error for a refused/reset/unreachable connection or a
#: recoverable channel error, and the raw errors on paths kombu does not wrap.
#: Not retried: anything else (bad credentials, a serialization error, a queue
#: declared with other arguments) - waiting would not fix it.
RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError,
    RecoverableConnectionError,
    RecoverableChannelError,
    MessageNacked,
    OSError,  # refused, reset, unreachable, DNS failure, socket timeout
)


class PublishBudgetExceeded(OperationalError):
    """No node took the publish of ``task_id`` for the whole retry budget."""

    def __init__(
        self, task_id: str, budget: float, elapsed: float, attempts: int, last: BaseException
    ) -> None:
        self.task_id = task_id
        self.budget = budget
        self.elapsed = elapsed
        self.attempts = attempts
        self.last = last
        super().__init__(
            f"publish of {task_id} not confirmed after {elapsed:.1f} s of retrying "
            f"({attempts} attempts, budget {budget:g} s): {last!r}"
        )


def retry_intervals(
    start: float = PUBLISH_RETRY_INTERVAL_START,
    step: float = PUBLISH_RETRY_INTERVAL_STEP,
    maximum: float = PUBLISH_RETRY_INTERVAL_MAX,
) -> Iterator[float]:
    """Sleeps between attempts: start, start + step, ... capped at maximum."""
    value = start
    while True:
        yield min(value, maximum)
        value += step


def node_name(connection: Any) -> str:
    """The node a kombu connection is on (or will try next), password masked."""
    try:
        return sanitize_url(connection.as_uri())
    except Exception:  # a broken connection object must not hide the real error
        return "?"


def node_count(connection: Any) -> int:
    """Nodes in a kombu connection's failover list."""
    try:
        return max(1, len(connection.alt or ()))
    except Exception:
        return 1


class FailoverRounds:
    """When to try again after a failed publish: every node of the failover list in turn
    without waiting, a pause of :func:`retry_intervals` after each full round, for
    ``budget`` seconds from the first failure. One per publisher; :meth:`reset` once a
    publish went through."""

    def __init__(
        self, nodes: int, budget: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.nodes = max(1, nodes)
        self.budget = budget
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        self.started: float | None = None
        self.failures = 0
        self._intervals = retry_intervals()

    def after_failure(self, task_id: str, error: BaseException) -> tuple[float, float]:
        """(seconds to wait before the next attempt, seconds retried so far); raises
        :class:`PublishBudgetExceeded` once the budget is spent."""
        now = self.clock()
        if self.started is None:
            self.started = now
        elapsed = now - self.started
        self.failures += 1
        if elapsed >= self.budget:
            raise PublishBudgetExceeded(task_id, self.budget, elapsed, self.failures, error)
        wait = next(self._intervals) if self.failures % self.nodes == 0 else 0.0
        return min(wait, self.budget - elapsed), elapsed


def publish_with_budget(
    send: Callable[[], Any],
    *,
    task_id: str,
    budget: float,
    producer: Any = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Any:
    """Call ``send()`` until it returns, retrying :data:`RETRYABLE_ERRORS` for
    ``budget`` seconds from the first failure; then raise
    :class:`PublishBudgetExceeded`.

    ``producer`` is the kombu producer ``send`` publishes through.  After a failed
    attempt it is moved to the next node of the failover list with a fresh channel;
    the next attempt follows at once, until every node failed in a row (a round),
    then after a sleep of :func:`retry_intervals` (1, 2, 3, 3 ... s).  Every failed
    attempt is logged: the node, the error, how long it has been retrying, the next
    node and when.
    """
    connection = getattr(producer, "connection", None)
    rounds = FailoverRounds(node_count(connection), budget, clock)  # no producer: 1 node
    while True:
        node = node_name(connection)
        try:
            result = send()
        except RETRYABLE_ERRORS as exc:
            try:
                wait, elapsed = rounds.after_failure(task_id, exc)
            except PublishBudgetExceeded as error:
                logger.error("%s; giving up", error)
                raise error from exc
            if producer is not None:
                _next_node(producer)
                connection = producer.connection
            logger.warning(
                "publish of %s: attempt %d via %s failed: %r; retrying for %.1f s of "
                "the %g s budget; next attempt in %.1f s via %s",
                task_id,
                rounds.failures,
                node,
                exc,
                elapsed,
                budget,
                wait,
                node_name(connection),
            )
            sleep(wait)
            continue
        if rounds.started is not None:
            logger.warning(
                "publish of %s confirmed via %s after %.1f s of retrying (%d attempts)",
                task_id,
                node,
                clock() - rounds.started,
                rounds.failures + 1,
            )
        return result


def _next_node(producer: Any) -> None:
    """Start the next attempt on the next node, with a fresh channel.

    kombu leaves the producer on the channel of the dead connection when it gives
    up (its ``ensure()`` revives the producer only after a reconnection that
    succeeded); a channel promise makes the next publish reconnect.
    """
    conn = producer.connection
    try:
        conn.maybe_switch_next()  # closes the dead connection, moves to the next URL
    except Exception:  # closing a dead connection may fail: it is gone either way
        logger.debug("closing the failed connection", exc_info=True)
    producer.revive(conn)


class BudgetedTask(Task):
    """A Celery task whose ``apply_async`` retries for the publish budget."""

    #: Set from the environment by app.celery (``WorkerSettings.publish_retry_seconds``).
    publish_retry_seconds: float = DEFAULT_PUBLISH_RETRY_SECONDS

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: Any = None,
        **options: Any,
    ) -> Any:
        parent: Any = super()
        if self.app.conf.task_always_eager:  # runs here, publishes nothing
            return parent.apply_async(
                args, kwargs, task_id, producer, link, link_error, shadow, **options
            )
        # One id for every attempt: a retried publish is the same task.
        task_id = task_id or uuid()
        options.setdefault("confirm_timeout", PUBLISH_CONFIRM_TIMEOUT_SECONDS)
        with self.app.producer_or_acquire(producer) as P:

            def send() -> Any:
                return parent.apply_async(
                    args, kwargs, task_id, P, link, link_error, shadow, **options
                )

            return publish_with_budget(
                send, task_id=task_id, budget=self.publish_retry_seconds, producer=P
            )
