"""Celery settings for the worker cluster, in one place.

Delivery is AT-LEAST-ONCE: every published task runs to completion at least
once, even if a worker or a RabbitMQ node dies at any moment, but a task CAN
run more than once (a worker killed after the task's side effects but before
its ack, a connection lost mid-task, a publish retried after its confirm was
lost).  Tasks must therefore be idempotent.

``WorkerSettings.from_env()`` reads the environment (the Kubernetes Deployment
sets it; broker credentials come from a Secret), ``celery_config()`` turns it
into Celery's settings.  The same function's output is what the workers in
Kubernetes load and what the tests boot.

Environment variables
---------------------
``CELERY_BROKER_URLS``      required; comma-separated ``amqp://`` / ``amqps://``
                            URLs, one per RabbitMQ node (failover list).
``CELERY_BROKER_ROTATION``  optional non-negative int: which URL this process
                            tries first.  Default: derived stably from the
                            host (pod) name, so workers spread over nodes.
``CELERY_QUEUE``            queue name (default ``celery``).
``CELERY_POOL``             ``threads`` (default), ``prefork`` or ``solo``.
``CELERY_CONCURRENCY``      positive int; default 100 for threads (the tasks
                            mostly sleep), the CPU count for prefork, 1 for solo.
``CELERY_BROKER_HEARTBEAT`` AMQP heartbeat in seconds (default 3, 0 = off).
``CELERY_REMOTE_CONTROL``   ``1`` to let ``celery inspect``/``control`` reach the
                            workers (default ``0``: off, see ``celery_config``).
``CELERY_PUBLISH_RETRY_SECONDS`` how long a publish keeps retrying while no
                            node takes it (default 120; 1 to 3600): the
                            publish retry budget, see
                            ``DEFAULT_PUBLISH_RETRY_SECONDS``.
``HOSTNAME``                the pod name in Kubernetes; used for the rotation.

Read elsewhere: ``COUNT_STEP_SECONDS`` and ``TASK_LEDGER`` (app/tasks.py),
``CELERY_LIVENESS_FILE`` (app/liveness.py).
"""

from __future__ import annotations

import os
import re
import socket
import sys
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from kombu import Exchange, Queue

ENV_BROKER_URLS = "CELERY_BROKER_URLS"
ENV_BROKER_ROTATION = "CELERY_BROKER_ROTATION"
ENV_QUEUE = "CELERY_QUEUE"
ENV_POOL = "CELERY_POOL"
ENV_CONCURRENCY = "CELERY_CONCURRENCY"
ENV_HEARTBEAT = "CELERY_BROKER_HEARTBEAT"
ENV_PUBLISH_RETRY_SECONDS = "CELERY_PUBLISH_RETRY_SECONDS"
ENV_REMOTE_CONTROL = "CELERY_REMOTE_CONTROL"
ENV_METRICS_PORT = "CELERY_METRICS_PORT"
ENV_HOSTNAME = "HOSTNAME"
# Read by app/tasks.py (which imports the app, so they are named here).
ENV_STEP_SECONDS = "COUNT_STEP_SECONDS"
ENV_LEDGER = "TASK_LEDGER"

BROKER_SCHEMES = ("amqp", "amqps", "pyamqp")
POOLS = ("threads", "prefork", "solo")
DEFAULT_QUEUE = "celery"
DEFAULT_THREADS_CONCURRENCY = 100
DEFAULT_HEARTBEAT_SECONDS = 3

# --- The publish retry budget (the one place it is defined) -------------------
# A publish (``apply_async`` of any task of app.celery: the scheduler,
# bench.publish, a task that publishes) keeps retrying for
# DEFAULT_PUBLISH_RETRY_SECONDS of wall-clock time (CELERY_PUBLISH_RETRY_SECONDS
# overrides it) while no node takes it (connection refused, unreachable, DNS, a
# nack), then raises app.publish.PublishBudgetExceeded.  That outlasts a node
# being killed (the next URL is tried at once), a quorum-queue leader election (a
# few seconds), a RabbitMQ pod being rescheduled and the whole cluster restarting:
# measured here (tests/integration/test_publish_outage.py), all three nodes
# stopped (6.3 s), down 30 s and started again (clustered after 27 s): the
# publish waiting it out was confirmed after 57 s of retrying; 120 s leaves
# that restart about twice its time.  A publisher
# facing a cluster that is really gone still fails, after the budget + one
# attempt (refused: milliseconds; a node that does not answer:
# broker_connection_timeout).
#
# The budget is a deadline enforced by app.publish around Celery's own retry,
# not a retry count in task_publish_retry_policy: kombu caps its connection
# step at broker_connection_timeout *in total* (Connection.default_channel ->
# _extract_failover_opts() -> _ensure_connection(timeout=connect_timeout)), and
# raises an OperationalError that Connection.ensure() does not retry, so any
# max_retries there gave up after ~6 s (4 s + the back-off sleep in progress).
# Celery's own policy is a single attempt; app.publish goes through the nodes.
DEFAULT_PUBLISH_RETRY_SECONDS = 120.0
# How long a publish waits for RabbitMQ's confirm before it is retried via the next
# node. A node whose machine vanished silently never answers: without a timeout the
# publisher waits until the node is replaced (a minute or more). A confirm normally
# comes in milliseconds, and within a few seconds during a quorum-queue leader
# election; a publish retried after a timeout may be delivered twice (same task id).
PUBLISH_CONFIRM_TIMEOUT_SECONDS = 5.0
MIN_PUBLISH_RETRY_SECONDS = 1.0
MAX_PUBLISH_RETRY_SECONDS = 3600.0
# After a failed attempt the next node is tried at once; after a full round
# over the nodes app.publish sleeps 1, 2, 3, 3, 3 ... s (a cluster that is back
# is used within 3 s; one log line per attempt).
PUBLISH_RETRY_INTERVAL_START = 1.0
PUBLISH_RETRY_INTERVAL_STEP = 1.0
PUBLISH_RETRY_INTERVAL_MAX = 3.0


METRICS_PORT_ALLOWED = (
    "a TCP port from 1 to 65535, or 0 for none; 0 with the prefork pool (its tasks run "
    "in child processes, whose counters one HTTP server cannot see)"
)


class SettingsError(ValueError):
    """A bad environment value: one line naming the variable, the value (any
    password masked) and what is allowed.  Command lines print it and exit 2."""


def sanitize_url(url: str) -> str:
    """Mask the password in a URL (works on malformed URLs too)."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1**@", url)


def _bad(var: str, value: object, allowed: str) -> SettingsError:
    return SettingsError(f"{var}={value!r} is invalid: expected {allowed}")


def _parse_broker_urls(raw: str | None) -> tuple[str, ...]:
    allowed = (
        "a comma-separated list of amqp:// or amqps:// URLs with a host, "
        "one per RabbitMQ node, without duplicates"
    )
    if raw is None or not raw.strip():
        raise SettingsError(f"{ENV_BROKER_URLS} is not set: expected {allowed}")
    urls = tuple(part.strip() for part in raw.split(","))
    # Never echo credentials: every URL in an error message is sanitized.
    shown = ",".join(sanitize_url(u) for u in urls)
    if any(not u for u in urls):
        raise _bad(ENV_BROKER_URLS, shown, allowed + " (found an empty entry)")
    for url in urls:
        try:
            parts = urlsplit(url)
            host = parts.hostname
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise _bad(ENV_BROKER_URLS, shown, allowed) from None
        if parts.scheme not in BROKER_SCHEMES or not host:
            raise _bad(ENV_BROKER_URLS, shown, allowed)
    if len(set(urls)) != len(urls):
        raise _bad(ENV_BROKER_URLS, shown, allowed + " (found a duplicate)")
    return urls


def _parse_int(var: str, raw: str, minimum: int, allowed: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise _bad(var, raw, allowed) from None
    if value < minimum:
        raise _bad(var, raw, allowed)
    return value


def _parse_seconds(var: str, raw: str, minimum: float, maximum: float) -> float:
    allowed = f"a number of seconds from {minimum:g} to {maximum:g}"
    try:
        value = float(raw.strip())
    except ValueError:
        raise _bad(var, raw, allowed) from None
    if not minimum <= value <= maximum:  # also rejects nan
        raise _bad(var, raw, allowed)
    return value


def stable_rotation(hostname: str, n_urls: int) -> int:
    """Stable (not ``hash()``, which is salted per process) offset for a host."""
    if n_urls <= 0:
        raise ValueError("n_urls must be positive")
    return zlib.crc32(hostname.encode("utf-8")) % n_urls


@dataclass(frozen=True)
class WorkerSettings:
    """Everything the environment decides about a worker (or publisher)."""

    broker_urls: tuple[str, ...]
    rotation: int
    hostname: str
    queue: str = DEFAULT_QUEUE
    pool: str = "threads"
    concurrency: int = DEFAULT_THREADS_CONCURRENCY
    heartbeat: int = DEFAULT_HEARTBEAT_SECONDS
    publish_retry_seconds: float = DEFAULT_PUBLISH_RETRY_SECONDS
    remote_control: bool = False
    #: Where the worker serves Prometheus metrics (app.metrics); 0: not at all.
    metrics_port: int = 0

    @property
    def rotated_broker_urls(self) -> list[str]:
        """The failover list, starting at this worker's own node."""
        k = self.rotation % len(self.broker_urls)
        return list(self.broker_urls[k:] + self.broker_urls[:k])

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WorkerSettings:
        env: Mapping[str, str] = os.environ if environ is None else environ
        urls = _parse_broker_urls(env.get(ENV_BROKER_URLS))
        hostname = env.get(ENV_HOSTNAME, "").strip() or socket.gethostname()

        raw_rotation = env.get(ENV_BROKER_ROTATION, "").strip()
        if raw_rotation:
            rotation = _parse_int(
                ENV_BROKER_ROTATION, raw_rotation, 0, "a non-negative integer"
            ) % len(urls)
        else:
            rotation = stable_rotation(hostname, len(urls))

        queue = env.get(ENV_QUEUE, DEFAULT_QUEUE).strip()
        if not queue or len(queue) > 200 or any(c.isspace() for c in queue):
            raise _bad(ENV_QUEUE, queue, "a non-empty queue name without whitespace")

        pool = env.get(ENV_POOL, "threads").strip().lower()
        if pool not in POOLS:
            raise _bad(ENV_POOL, pool, "one of " + ", ".join(POOLS))

        raw_concurrency = env.get(ENV_CONCURRENCY, "").strip()
        if raw_concurrency:
            concurrency = _parse_int(ENV_CONCURRENCY, raw_concurrency, 1, "a positive integer")
        elif pool == "threads":
            concurrency = DEFAULT_THREADS_CONCURRENCY
        elif pool == "prefork":
            concurrency = os.cpu_count() or 1
        else:
            concurrency = 1
        if pool == "solo" and concurrency != 1:
            raise _bad(ENV_CONCURRENCY, raw_concurrency, "1 (or unset) with the solo pool")

        raw_heartbeat = env.get(ENV_HEARTBEAT, "").strip()
        heartbeat = (
            _parse_int(ENV_HEARTBEAT, raw_heartbeat, 0, "a non-negative integer (seconds)")
            if raw_heartbeat
            else DEFAULT_HEARTBEAT_SECONDS
        )

        raw_budget = env.get(ENV_PUBLISH_RETRY_SECONDS, "").strip()
        publish_retry_seconds = (
            _parse_seconds(
                ENV_PUBLISH_RETRY_SECONDS,
                raw_budget,
                MIN_PUBLISH_RETRY_SECONDS,
                MAX_PUBLISH_RETRY_SECONDS,
            )
            if raw_budget
            else DEFAULT_PUBLISH_RETRY_SECONDS
        )

        raw_port = env.get(ENV_METRICS_PORT, "").strip()
        metrics_port = (
            _parse_int(ENV_METRICS_PORT, raw_port, 0, METRICS_PORT_ALLOWED) if raw_port else 0
        )
        if metrics_port > 65535 or (metrics_port and pool == "prefork"):
            raise _bad(ENV_METRICS_PORT, raw_port, METRICS_PORT_ALLOWED)

        raw_remote = env.get(ENV_REMOTE_CONTROL, "0").strip()
        if raw_remote not in ("0", "1"):
            raise _bad(ENV_REMOTE_CONTROL, raw_remote, "0 (off) or 1 (on)")

        return cls(
            broker_urls=urls,
            rotation=rotation,
            hostname=hostname,
            queue=queue,
            pool=pool,
            concurrency=concurrency,
            heartbeat=heartbeat,
            publish_retry_seconds=publish_retry_seconds,
            remote_control=raw_remote == "1",
            metrics_port=metrics_port,
        )

    def to_env(self) -> dict[str, str]:
        """The environment ``from_env`` reads these settings back from (its inverse:
        ``WorkerSettings.from_env(s.to_env()) == s`` for valid settings).  What a
        process that starts workers or publishers puts in their environment."""
        return {
            ENV_BROKER_URLS: ",".join(self.broker_urls),
            ENV_BROKER_ROTATION: str(self.rotation),
            ENV_HOSTNAME: self.hostname,
            ENV_QUEUE: self.queue,
            ENV_POOL: self.pool,
            ENV_CONCURRENCY: str(self.concurrency),
            ENV_HEARTBEAT: str(self.heartbeat),
            ENV_PUBLISH_RETRY_SECONDS: repr(float(self.publish_retry_seconds)),
            ENV_REMOTE_CONTROL: "1" if self.remote_control else "0",
            ENV_METRICS_PORT: str(self.metrics_port),
        }


def settings_or_exit(prog: str, environ: Mapping[str, str] | None = None) -> WorkerSettings:
    """``WorkerSettings.from_env()`` for a command line: on a bad value, one line
    on stderr (``prog: error: VAR='value' is invalid: expected ...``) and exit
    status 2, no traceback."""
    try:
        return WorkerSettings.from_env(environ)
    except SettingsError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def task_queue(settings: WorkerSettings) -> Queue:
    """The one work queue: quorum (replicated by Raft on every node), bound to
    a topic exchange of the same name (native delayed delivery, which Celery
    uses for ETA/countdown on quorum queues, cannot route via direct exchanges).
    """
    name = settings.queue
    return Queue(
        name,
        Exchange(name, type="topic", durable=True),
        routing_key=name,
        durable=True,
        queue_arguments={"x-queue-type": "quorum"},
    )


def celery_config(settings: WorkerSettings) -> dict[str, Any]:
    """Celery settings (new-style lowercase names) for no-loss delivery."""
    return {
        # --- Broker: a failover list, rotated so workers spread over nodes. -----
        # kombu tries the URLs in order and moves on to the next one when a node
        # is unreachable (failover strategy "round-robin").
        "broker_url": settings.rotated_broker_urls,
        "broker_failover_strategy": "round-robin",
        # Publisher confirms: a publish only succeeds once the quorum queue has
        # the message on a majority of nodes.  Without confirms a publish during
        # a failover or a resource alarm can vanish silently.  Celery's docs say
        # quorum queues require it.
        "broker_transport_options": {"confirm_publish": True},
        # Workers never give up reconnecting: a worker that exits while the
        # cluster is briefly away only adds a restart to the outage.
        "broker_connection_retry": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_connection_timeout": 4.0,
        # A silently dead peer (machine gone: no TCP reset) is noticed only through
        # missed heartbeats, on both sides: RabbitMQ redelivers the tasks a lost
        # worker held once it declares that worker's connection dead, and a worker
        # leaves a lost broker the same way. Measured on the pod twin
        # (worker-machine-loss, 2026-12-01): the lost worker's tasks ran again elsewhere
        # 27.3 s after the loss with 10 s, 12.1 s with 4 s, 7.8 s with 3 s (the
        # bound: 10 s plus the task's own length; docs/local.md). The price, measured
        # (worker-pause): a worker paused 2-6 s kept its tasks, one paused 8 s or more
        # (CPU-bound work holding the GIL in the threads pool, say) was taken for dead
        # and its tasks ran again (duplicates, never losses).
        "broker_heartbeat": settings.heartbeat,
        # A channel error while (re)starting the consumer - e.g. a quorum queue
        # that has no leader for a moment during an election - restarts the
        # consumer instead of stopping the worker.
        "broker_channel_error_retry": True,
        # No remote control: each worker would own an exclusive pidbox queue on the
        # node its connection is on. When that node's machine vanishes silently the
        # queue stays "locked" until the node is replaced, and a worker that
        # reconnected elsewhere fails to redeclare it (RESOURCE_LOCKED) and restarts
        # its consumer in a loop: measured on the pod twin (machine-loss, 2026-12-01),
        # the two workers that had been on the lost node ran nothing for 65 s. The
        # price: `celery inspect` / `celery control` get no answer (the liveness
        # probe does not use them; CELERY_REMOTE_CONTROL=1 turns it back on).
        "worker_enable_remote_control": settings.remote_control,
        # --- Queue: quorum, on a topic exchange. -------------------------------
        "task_queues": (task_queue(settings),),
        "task_default_queue": settings.queue,
        "task_default_queue_type": "quorum",
        "task_default_exchange": settings.queue,
        "task_default_exchange_type": "topic",
        "task_default_routing_key": settings.queue,
        # Queues created on the fly (a route to an undeclared queue) are quorum
        # queues on topic exchanges too, never classic single-node queues.
        "task_create_missing_queues": True,
        "task_create_missing_queue_type": "quorum",
        "task_create_missing_queue_exchange_type": "topic",
        # Quorum queues do not support global QoS; Celery detects them and uses
        # per-consumer prefetch (keep this on).  ETA/countdown then needs native
        # delayed delivery: its celery_delayed_* queues are quorum queues too.
        "worker_detect_quorum_queues": True,
        "broker_native_delayed_delivery_queue_type": "quorum",
        # --- Publishing: retry through a failover. ------------------------------
        # Celery/kombu's own retry is a single attempt: kombu copies this policy
        # into the connection's transport options, so its connection step makes
        # one connection attempt (not broker_connection_timeout's worth) and a
        # publish that fails raises at once.  The failover to the next node, the
        # back-off and the time budget (DEFAULT_PUBLISH_RETRY_SECONDS) are
        # app.publish.BudgetedTask's, the task class of app.celery, because kombu
        # cannot express a time budget here (see the comment at the top).
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 0,
            "interval_start": 0.0,
            "interval_step": 0.0,
            "interval_max": 0.0,
        },
        # --- Consuming: ack only after the task ran. ----------------------------
        # acks_late: the message stays unacked while the task runs; if the worker
        # dies (SIGKILL, OOM, node loss) RabbitMQ redelivers it to another worker.
        "task_acks_late": True,
        # Also requeue when a prefork child is killed (default: ack and fail it).
        "task_reject_on_worker_lost": True,
        # A task that raised or timed out is finished (failed), not lost: ack it
        # rather than loop a poison message forever.
        "task_acks_on_failure_or_timeout": True,
        # Hold no more messages than can run right now: with acks_late, anything
        # prefetched is redelivered (delayed) if this worker dies.  The prefetch
        # count is multiplier x concurrency.
        "worker_prefetch_multiplier": 1,
        # On connection loss a running late-ack task can no longer be acked: the
        # broker redelivers it, so it will run again elsewhere.  With prefork,
        # Celery can terminate the now-orphaned copy so both do not run in
        # parallel (the Celery 6 default).  The threads pool cannot kill a thread
        # (Celery only logs "Failed to cancel"), so there it stays off and the
        # orphan finishes its run; its duplicate is the at-least-once price.
        "worker_cancel_long_running_tasks_on_connection_loss": settings.pool == "prefork",
        # Celery's consumer, except that native delayed delivery is set up through
        # the node the worker is connected to instead of through every URL: the
        # stock step stalls consuming after a failover while it retries the dead
        # node (see app/bootsteps.py).
        "worker_consumer": "app.bootsteps:ClusterConsumer",
        # --- Pool. ---------------------------------------------------------------
        "worker_pool": settings.pool,
        "worker_concurrency": settings.concurrency,
        # --- Misc. ---------------------------------------------------------------
        # No result backend: the ledger (app/ledger.py) proves completion.
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": True,
        "enable_utc": True,
    }
