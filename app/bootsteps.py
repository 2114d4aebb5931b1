"""Worker consumer tuned for ONE RabbitMQ cluster behind a failover URL list.

Two changes to Celery's stock consumer (``worker_consumer`` in app/settings.py):

1. Native delayed delivery is set up through the connected node only.
2. A liveness heartbeat file is touched (see :mod:`app.liveness`).

1. Delayed delivery
-------------------

Celery 5.7's ``DelayedDelivery`` consumer bootstep (native delayed delivery,
used for ETA/countdown/retry on quorum queues) declares its exchanges, queues
and bindings through EVERY URL of ``broker_url``, with retries, every time the
consumer (re)starts - and the worker consumes nothing until it is done.  With a
failover list that names the nodes of one cluster, that is redundant (exchanges,
queues and bindings are cluster-wide) and harmful exactly when it matters: after
a node dies, the workers that were connected to it reconnect to a live node at
once, then stall retrying the dead node's URL (measured here: ~9 s with a
connection refused; on Kubernetes, where a dead machine does not answer at all,
each attempt waits broker_connection_timeout).

``ClusterDelayedDelivery`` declares the same topology through the node the
consumer is connected to, falling back to the other URLs only if that fails.

2. Liveness
-----------
``LivenessHeartbeat`` touches the heartbeat file from the consumer's timer (it
runs in the event loop: a wedged loop stops touching), and ``ClusterConsumer``
also touches it about every second while it retries a broker connection, so a
broker outage does not look like a dead worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from celery import bootsteps
from celery.utils.log import get_logger
from celery.worker.consumer import Consumer
from celery.worker.consumer.delayed_delivery import (
    MAX_RETRIES,
    RETRIED_EXCEPTIONS,
    RETRY_INTERVAL,
    DelayedDelivery,
)
from kombu.utils.functional import retry_over_time
from kombu.utils.url import maybe_sanitize_url, parse_url

from app.liveness import TOUCH_INTERVAL_SECONDS, liveness_file, touch

logger = get_logger(__name__)

_STOCK_STEP = "celery.worker.consumer.delayed_delivery:DelayedDelivery"
_OUR_STEP = "app.bootsteps:ClusterDelayedDelivery"
_LIVENESS_STEP = "app.bootsteps:LivenessHeartbeat"


def _host_port(hostname: str | None, port: int | None) -> tuple[str, int]:
    return (hostname or "").lower(), int(port or 0)


def connected_first(urls: Sequence[str], hostname: str | None, port: int | None) -> list[str]:
    """``urls`` with the one for ``hostname:port`` (the live connection) first."""
    current = _host_port(hostname, port)
    first = [u for u in urls if _host_port(*_parts(u)) == current]
    return first + [u for u in urls if u not in first]


def _parts(url: str) -> tuple[str | None, int | None]:
    parts = parse_url(url)
    return parts.get("hostname"), parts.get("port")


class ClusterDelayedDelivery(DelayedDelivery):
    """Native delayed delivery set up once per start, via the connected node."""

    def start(self, c: Any) -> None:
        app = c.app
        try:
            self._validate_configuration(app)
        except ValueError as exc:
            logger.critical("Configuration validation failed: %s", exc)
            raise
        self._validate_broker_urls(app.conf.broker_url)
        raw = app.conf.broker_url
        urls = raw.split(";") if isinstance(raw, str) else list(raw)  # configured order
        conn = c.connection
        ordered = connected_first(
            urls, getattr(conn, "hostname", None), getattr(conn, "port", None)
        )
        for url in ordered:
            try:
                retry_over_time(
                    self._setup_delayed_delivery,
                    args=(c, url),
                    catch=RETRIED_EXCEPTIONS,
                    errback=self._on_retry,
                    interval_start=RETRY_INTERVAL,
                    max_retries=MAX_RETRIES,
                )
                return
            except Exception as exc:
                logger.warning(
                    "Failed to setup delayed delivery for %r: %s", maybe_sanitize_url(url), exc
                )
        logger.critical(
            "Failed to setup delayed delivery for all broker URLs. "
            "Native delayed delivery will not be available."
        )


class LivenessHeartbeat(bootsteps.StartStopStep):
    """Consumer bootstep: touch the liveness file from the consumer's timer."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Any = None
        self.path = liveness_file()

    def start(self, c: Any) -> None:
        touch(self.path)
        self.tref = c.timer.call_repeatedly(TOUCH_INTERVAL_SECONDS, touch, (self.path,))

    def stop(self, c: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    def shutdown(self, c: Any) -> None:
        self.stop(c)


class ClusterConsumer(Consumer):
    """Celery's consumer: :class:`ClusterDelayedDelivery` instead of the stock step,
    plus :class:`LivenessHeartbeat`, and a heartbeat while reconnecting."""

    class Blueprint(Consumer.Blueprint):
        default_steps: ClassVar[list[str]] = [
            *(
                _OUR_STEP if step == _STOCK_STEP else step
                for step in Consumer.Blueprint.default_steps
            ),
            _LIVENESS_STEP,
        ]

    def ensure_connected(self, conn: Any) -> Any:
        # kombu calls ``callback`` about once a second while it retries: touch the
        # liveness file there too (a worker waiting for the broker is not wedged).
        ensure_connection = conn.ensure_connection
        path = liveness_file()

        def ensure_connection_alive(*args: Any, callback: Any = None, **kwargs: Any) -> Any:
            def tick() -> None:
                touch(path)
                if callback is not None:
                    callback()

            return ensure_connection(*args, callback=tick, **kwargs)

        conn.ensure_connection = ensure_connection_alive
        try:
            return super().ensure_connected(conn)
        finally:
            del conn.ensure_connection  # back to the class's method
