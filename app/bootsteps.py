"""Worker consumer tuned for ONE RabbitMQ cluster behind a failover URL list.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

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

logger = get_logger(__name__)

_STOCK_STEP = "celery.worker.consumer.delayed_delivery:DelayedDelivery"
_OUR_STEP = "app.bootsteps:ClusterDelayedDelivery"


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


class ClusterConsumer(Consumer):
    """Celery's consumer with :class:`ClusterDelayedDelivery` in place of the stock step."""

    class Blueprint(Consumer.Blueprint):
        default_steps: ClassVar[list[str]] = [
            _OUR_STEP if step == _STOCK_STEP else step for step in Consumer.Blueprint.default_steps
        ]
