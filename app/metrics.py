"""The worker's Prometheus metrics (``prometheus_client``), served on
``CELERY_METRICS_PORT`` and scraped by the worker PodMonitoring
(components/monitoring.py).

Counted from Celery's own signals, in the worker process (the threads and solo
pools run tasks there; prefork is refused in :mod:`app.settings`):

* ``celery_tasks_received_total``: delivered to this worker (``task_received``);
* ``celery_tasks_redelivered_total``: of those, delivered before to some worker that
  did not acknowledge it (a worker or broker died, late acks);
* ``celery_tasks_started_total``, ``celery_tasks_succeeded_total``,
  ``celery_tasks_failed_total``, ``celery_tasks_retried_total``;
* ``celery_task_runtime_seconds``: a histogram of run times (prerun to postrun);
* ``celery_tasks_running``: running now.

Every series has a ``task`` label (the task's name): a handful of task types, never
ids.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import signals
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

#: Run-time buckets (seconds): the article's tasks run 1-10 s; up to the 10-minute
#: tasks a grace period would still cover.
RUNTIME_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


def _task_name(task_or_request: Any) -> str:
    """The ``task`` label: the task's name (a Task or a Request carries it)."""
    return getattr(task_or_request, "name", None) or "unknown"


class WorkerMetrics:
    """One registry and its series; :meth:`connect` wires them to Celery's signals."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["task"]

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=self.registry)

        self.received = counter("celery_tasks_received", "Tasks delivered to this worker")
        self.redelivered = counter(
            "celery_tasks_redelivered",
            "Tasks delivered again after an earlier delivery was never acknowledged",
        )
        self.started = counter("celery_tasks_started", "Tasks this worker started")
        self.succeeded = counter("celery_tasks_succeeded", "Tasks that returned")
        self.failed = counter("celery_tasks_failed", "Tasks that raised")
        self.retried = counter("celery_tasks_retried", "Tasks that asked to be retried")
        self.runtime = Histogram(
            "celery_task_runtime_seconds",
            "How long tasks ran",
            labels,
            buckets=RUNTIME_BUCKETS,
            registry=self.registry,
        )
        self.running = Gauge(
            "celery_tasks_running", "Tasks running now", labels, registry=self.registry
        )
        self._started_at: dict[str, float] = {}
        self._lock = threading.Lock()

    # -- signal receivers (weak=False: bound methods must outlive the caller) --------
    def on_received(self, request: Any = None, **_: Any) -> None:
        name = _task_name(request)
        self.received.labels(name).inc()
        delivery = getattr(request, "delivery_info", None) or {}
        if delivery.get("redelivered"):
            self.redelivered.labels(name).inc()

    def on_prerun(self, task_id: str = "", task: Any = None, **_: Any) -> None:
        name = _task_name(task)
        self.started.labels(name).inc()
        self.running.labels(name).inc()
        with self._lock:
            self._started_at[task_id] = time.monotonic()

    def on_postrun(self, task_id: str = "", task: Any = None, **_: Any) -> None:
        name = _task_name(task)
        with self._lock:
            began = self._started_at.pop(task_id, None)
        if began is not None:
            self.runtime.labels(name).observe(time.monotonic() - began)
            self.running.labels(name).dec()

    def on_success(self, sender: Any = None, **_: Any) -> None:
        self.succeeded.labels(_task_name(sender)).inc()

    def on_failure(self, sender: Any = None, **_: Any) -> None:
        self.failed.labels(_task_name(sender)).inc()

    def on_retry(self, sender: Any = None, **_: Any) -> None:
        self.retried.labels(_task_name(sender)).inc()

    def connect(self) -> None:
        signals.task_received.connect(self.on_received, weak=False)
        signals.task_prerun.connect(self.on_prerun, weak=False)
        signals.task_postrun.connect(self.on_postrun, weak=False)
        signals.task_success.connect(self.on_success, weak=False)
        signals.task_failure.connect(self.on_failure, weak=False)
        signals.task_retry.connect(self.on_retry, weak=False)

    def serve(self, port: int) -> None:
        """The ``/metrics`` endpoint, on every address (the pod's); prometheus_client
        answers from a daemon thread of its own once bound."""
        start_http_server(port, registry=self.registry)


def install(port: int) -> WorkerMetrics | None:
    """Count and serve once the worker process starts (``worker_init``); producers that
    import the app (the scheduler) serve nothing. None when ``port`` is 0."""
    if not port:
        return None
    metrics = WorkerMetrics()
    metrics.connect()

    def serve() -> None:
        try:
            metrics.serve(port)
        except OSError:
            # Metrics never stop a worker from consuming: a scrape that fails is what
            # CeleryWorkerDown reports.
            log.exception("could not serve metrics on port %d", port)

    def start(**_: Any) -> None:
        # In a thread of its own: binding resolves the host's name (http.server's
        # getfqdn), which must not hold up the consumer where DNS is slow.
        threading.Thread(target=serve, name="metrics-http", daemon=True).start()

    signals.worker_init.connect(start, weak=False)
    return metrics
