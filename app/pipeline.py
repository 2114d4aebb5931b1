"""Publishing many tasks with publisher confirms, many in flight: the bulk publisher.

One task at a time (:class:`app.publish.BudgetedTask`) waits a network round trip
and a Raft commit for each confirm: ~1.4 ms a task on the twin, 303 tasks/s against
the article's 799/s without confirms (docs/bench.md). Here up to ``window`` publishes
are unconfirmed at once on one channel in confirm mode; RabbitMQ confirms them in
batches (``basic.ack`` with ``multiple``), and each task id is reported confirmed
(``on_confirm``) only once its own confirm arrived, so the guarantee is the same:
an id reported is in a quorum queue's majority.

The messages are Celery's own: each is built and sent by ``app.amqp`` (protocol 2,
routed as the app routes it; :class:`CeleryMessages`) on a producer whose channel does
not wait for the confirm; the workers consume them unchanged.

What was not confirmed is published again: on a ``basic.nack``, when a confirm does
not come within ``confirm_timeout``, or when the connection fails (then on the next
node of the failover list, with a pause after each full round of nodes, as
:func:`app.publish.publish_with_budget`). A task published again may be delivered
twice (same task id): at-least-once, never lost. If no confirm at all arrives for
``budget`` seconds, :class:`app.publish.PublishBudgetExceeded` is raised and
:attr:`ConfirmedPipeline.unconfirmed` names every task id not confirmed.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery import Celery, Task

from app.publish import RETRYABLE_ERRORS, FailoverRounds, node_count, node_name
from app.settings import DEFAULT_PUBLISH_RETRY_SECONDS, PUBLISH_CONFIRM_TIMEOUT_SECONDS

logger = logging.getLogger(__name__)

#: Unconfirmed publishes in flight on the channel. Measured on the twin (bench):
#: see docs/bench.md; more than a few hundred only adds memory.
DEFAULT_WINDOW = 256


class ConfirmTimeout(socket.timeout):
    """No confirm arrived within ``confirm_timeout`` for the oldest unconfirmed publish."""


@dataclass
class _Publish:
    task: Task
    task_id: str
    args: Sequence[Any]
    kwargs: Mapping[str, Any]


@dataclass(frozen=True)
class _Route:
    """What ``Task.apply_async`` and ``Celery.send_task`` work out for a task before
    they build its message: its execution options, routed by the app's router."""

    options: dict[str, Any]
    time_limit: Any
    soft_time_limit: Any
    ignore_result: Any


class CeleryMessages:
    """Sends ``_Publish``es as Celery task messages: each built by ``app.amqp``'s own
    ``create_task_message`` (protocol 2) and sent by its ``send_task_message`` (routing,
    serializer, compression, delivery mode and the publish signals as Celery has them).

    ``Task.apply_async`` does the same and more, per call: it resolves the task's
    options and route again (the router, the app's conf lookups), and has kombu look
    the queue up in its declaration cache; that is two thirds of its CPU time, and one
    publisher process's CPU is what bounds a pipeline (docs/bench.md). Here the route
    is resolved once per task (the app's routes, app/settings.py, depend on the task
    alone) and the queue declared once per producer (a new one after each reconnect).
    tests/unit/test_pipeline.py checks the message is the one ``apply_async`` sends.
    """

    def __init__(self) -> None:
        self._routes: dict[str, _Route] = {}
        self._declared_on: Any = None

    def route(self, task: Task) -> _Route:
        route = self._routes.get(task.name)
        if route is None:
            # As Task.apply_async, then Celery.send_task: the task's options, then the router.
            options = dict(task._get_exec_options())
            options.setdefault("ignore_result", task.ignore_result)
            time_limit, soft_time_limit, expires = (
                options.pop(k, None) for k in ("time_limit", "soft_time_limit", "expires")
            )
            if expires is not None:  # a deadline per message: not what a bulk publish sends
                raise ValueError(f"task {task.name}: ConfirmedPipeline does not send expires")
            ignore_result = options.pop("ignore_result")
            options = task.app.amqp.router.route(options, task.name, (), {}, task)
            route = _Route(options, time_limit, soft_time_limit, ignore_result)
            self._routes[task.name] = route
        return route

    def __call__(self, publish: _Publish, producer: Any) -> None:
        task = publish.task
        app = task.app
        route = self.route(task)
        if task.typing:  # the argument check apply_async makes
            check = getattr(task, "__header__", None)
            if check is not None:
                check(*publish.args, **publish.kwargs)
        parent = app.current_worker_task  # a task that publishes: its ids, as Celery sets them
        root_id = parent_id = None
        if parent is not None:
            root_id = parent.request.root_id or parent.request.id
            parent_id = parent.request.id
        message = app.amqp.create_task_message(
            publish.task_id,
            task.name,
            publish.args,
            publish.kwargs,
            reply_to=app.thread_oid,
            time_limit=route.time_limit,
            soft_time_limit=route.soft_time_limit,
            create_sent_event=app.conf.task_send_sent_event,
            root_id=root_id,
            parent_id=parent_id,
            ignore_result=route.ignore_result,
            **route.options,
        )
        # None: Celery declares the queue (kombu's cache); [] once it did on this producer.
        declare: list[Any] | None = None if producer is not self._declared_on else []
        app.amqp.send_task_message(
            producer,
            task.name,
            message,
            declare=declare,
            retry=False,  # what fails is published again by ConfirmedPipeline._recover
            **route.options,
        )
        self._declared_on = producer


@dataclass
class ConfirmedPipeline:
    """``submit()`` tasks, ``flush()`` to wait for every confirm; ``close()`` at the end.

    Not thread-safe: one pipeline per thread (it owns its connection).
    """

    app: Celery
    window: int = DEFAULT_WINDOW
    budget: float = DEFAULT_PUBLISH_RETRY_SECONDS
    on_confirm: Callable[[str], None] = lambda task_id: None
    confirm_timeout: float = PUBLISH_CONFIRM_TIMEOUT_SECONDS
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    send: Callable[[_Publish, Any], None] = field(default_factory=CeleryMessages)
    #: delivery tag (this channel's) -> what it published, oldest first.
    outstanding: dict[int, _Publish] = field(default_factory=dict)
    #: nacked or timed out: to publish again, in order.
    again: list[_Publish] = field(default_factory=list)
    confirmed: int = 0
    republished: int = 0
    reconnects: int = 0

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window!r}")
        options = dict(self.app.conf.broker_transport_options or {})
        # The channel is put in confirm mode here; kombu must not wait per publish.
        options["confirm_publish"] = False
        self.connection = self.app.connection_for_write(transport_options=options)
        self._rounds = FailoverRounds(node_count(self.connection), self.budget, self.clock)
        self._oldest_sent: float | None = None
        self._tag = 0
        try:
            self._open()
        except RETRYABLE_ERRORS as exc:  # no node yet: the budget applies from here
            self._recover(exc)

    # ------------------------------------------------------------------ public
    def submit(
        self,
        task: Task,
        task_id: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        """Publish ``task`` (returns once it is written, not confirmed); blocks while
        ``window`` publishes are unconfirmed."""
        self._pump(until=self.window - 1)
        self._publish(_Publish(task, task_id, tuple(args), dict(kwargs or {})))

    def flush(self) -> None:
        """Return once every submitted task is confirmed (publishing again what must be)."""
        self._pump(until=0)

    @property
    def unconfirmed(self) -> list[str]:
        return [p.task_id for p in (*self.outstanding.values(), *self.again)]

    def node(self) -> str:
        return node_name(self.connection)

    def close(self) -> None:
        try:
            self.connection.release()
        except Exception:  # a connection already gone: nothing left to release
            logger.debug("closing the pipeline's connection", exc_info=True)

    def __enter__(self) -> ConfirmedPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- private
    def _open(self) -> None:
        self.connection.ensure_connection(max_retries=1)
        self.channel = self.connection.channel()
        self.channel.confirm_select()
        self.channel.events["basic_ack"].add(self._on_ack)
        self.channel.events["basic_nack"].add(self._on_nack)
        self.producer = self.app.amqp.Producer(self.channel)
        self._tag = 0

    def _pump(self, until: int) -> None:
        """Until at most ``until`` publishes are unconfirmed and none waits to go again."""
        while True:
            if self.again and len(self.outstanding) < self.window:
                self._publish(self.again.pop(0))
            elif len(self.outstanding) <= until and not self.again:
                return
            else:
                self._wait_for_confirms()

    def _publish(self, publish: _Publish) -> None:
        try:
            self.send(publish, self.producer)
        except RETRYABLE_ERRORS as exc:
            self._recover(exc, also=[publish])
            return
        self._tag += 1
        if not self.outstanding:
            self._oldest_sent = self.clock()
        self.outstanding[self._tag] = publish

    def _wait_for_confirms(self) -> None:
        """Read the channel until a frame came or the oldest publish's confirm is late."""
        waited = 0.0 if self._oldest_sent is None else self.clock() - self._oldest_sent
        if waited >= self.confirm_timeout:
            late = ConfirmTimeout(
                f"no confirm for {len(self.outstanding)} publishes in {self.confirm_timeout:g} s"
            )
            self._recover(late)
            return
        try:
            self.connection.drain_events(timeout=self.confirm_timeout - waited)
        except (TimeoutError, socket.timeout):  # noqa: UP041 (the next round sees it late)
            pass
        except RETRYABLE_ERRORS as exc:
            self._recover(exc)

    def _on_ack(self, tag: int, multiple: bool) -> None:
        for done in self._take(tag, multiple):
            self.confirmed += 1
            self.on_confirm(done.task_id)
        self._progress()

    def _on_nack(self, tag: int, multiple: bool) -> None:
        nacked = self._take(tag, multiple)
        logger.warning(
            "%d publishes nacked via %s: publishing them again", len(nacked), self.node()
        )
        self.again.extend(nacked)
        self.republished += len(nacked)

    def _take(self, tag: int, multiple: bool) -> list[_Publish]:
        tags = [t for t in self.outstanding if t <= tag] if multiple else [tag]
        taken = [p for t in tags if (p := self.outstanding.pop(t, None)) is not None]
        self._oldest_sent = self.clock() if self.outstanding else None
        return taken

    def _progress(self) -> None:
        self._rounds.reset()

    def _recover(self, exc: BaseException, also: Sequence[_Publish] = ()) -> None:
        """The connection failed or a confirm was late: everything unconfirmed goes
        again on a fresh connection (the next node), within the budget."""
        self.again = [*self.outstanding.values(), *also, *self.again]
        self.republished += len(self.outstanding) + len(also)
        self.outstanding.clear()
        self._oldest_sent = None
        while True:
            first = self.again[0].task_id if self.again else "?"
            wait, elapsed = self._rounds.after_failure(first, exc)
            failed_node = self.node()
            try:
                self.connection.maybe_switch_next()  # closes the failed connection too
            except Exception:
                logger.debug("closing the failed connection", exc_info=True)
            logger.warning(
                "pipeline via %s failed: %r; %d unconfirmed publishes go again via %s in "
                "%.1f s (retrying for %.1f s of the %g s budget)",
                failed_node,
                exc,
                len(self.again),
                self.node(),
                wait,
                elapsed,
                self.budget,
            )
            self.sleep(wait)
            self.reconnects += 1
            try:
                self._open()
                return
            except RETRYABLE_ERRORS as failed:
                exc = failed
