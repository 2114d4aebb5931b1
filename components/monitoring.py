"""Metrics and alerts: GKE Managed Prometheus scrapes RabbitMQ and evaluates our rules.

One small function per object, as in :mod:`components.rabbitmq`:

* :func:`rabbitmq_pod_monitoring`: RabbitMQ's aggregated ``/metrics`` (node health,
  alarms, cluster membership) from every RabbitMQ pod, job ``rabbitmq``;
* :func:`queue_pod_monitoring`: its per-queue endpoint (``/metrics/detailed``, only the
  families the alerts read, only our vhost), job ``rabbitmq-queues``; a second object
  because one target per pod and path keeps ``up`` one series per pod and job;
* :func:`rules`: the alert rules (Managed Prometheus ``Rules``, namespaced: GMP
  evaluates them on the RabbitMQ namespace's metrics only);
* :func:`worker_pod_monitoring` and :func:`worker_rules`: the same for the workers'
  own counters (app/metrics.py), job ``celery-workers``, in the workers' namespace
  (not with the prefork pool, whose tasks run in child processes).

The rules are written once, by :func:`rule_groups` and :func:`worker_rule_groups`
(pure): the ``Rules`` objects carry them and ``tests/unit/test_alert_rules.py`` feeds
the same groups to ``promtool test rules`` with one test per alert. Each alert carries a one-line
runbook (``annotations.runbook``), also in docs/observability.md.

Metric names are the ``rabbitmq_prometheus`` plugin's, read off the pod twin's
RabbitMQ 4.3.6 endpoints (docs/observability.md lists them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from app.settings import DEFAULT_QUEUE
from components import kube
from components.config import MonitoringConfig, StackConfig
from components.kube import Manifest
from components.names import RABBITMQ_APP, WORKER_APP, app_labels, selector_labels
from components.rabbitmq_conf import DEAD_LETTER_QUEUE
from components.workers import METRICS_PORT_NAME

API_VERSION = "monitoring.googleapis.com/v1"
METRICS_JOB = "rabbitmq"
QUEUES_JOB = "rabbitmq-queues"
PROMETHEUS_PORT_NAME = "prometheus"  # the StatefulSet's container port
#: The per-queue families the rules read (``/metrics/detailed?family=...``).
QUEUE_FAMILIES = ("queue_coarse_metrics", "queue_consumer_count", "queue_delivery_metrics")
RULES_NAME = "celery-cluster-alerts"
WORKERS_JOB = "celery-workers"
WORKER_RULES_NAME = "celery-worker-alerts"


@dataclass(frozen=True)
class MonitoringArgs:
    """What the monitoring objects need from the stack."""

    monitoring: MonitoringConfig
    namespace: str  # RabbitMQ's: the pods scraped, the metrics the rules see
    workers_namespace: str
    replicas: int
    vhost: str
    queue: str = DEFAULT_QUEUE
    dead_letter_queue: str = DEAD_LETTER_QUEUE
    longest_task_seconds: int = 10
    # The workers serve app.metrics (every pool but prefork).
    worker_metrics: bool = True

    @classmethod
    def from_stack(cls, config: StackConfig, vhost: str) -> MonitoringArgs:
        return cls(
            monitoring=config.monitoring,
            namespace=config.rabbitmq.namespace,
            workers_namespace=config.workers.namespace,
            replicas=config.rabbitmq.replicas,
            vhost=vhost,
            longest_task_seconds=config.workers.longest_task_seconds,
            worker_metrics=config.workers.serves_metrics,
        )


# --- scraping ---------------------------------------------------------------------


def _pod_monitoring(
    args: MonitoringArgs,
    name: str,
    endpoint: Mapping[str, Any],
    component: str,
    app: str = RABBITMQ_APP,
) -> Manifest:
    namespace = args.namespace if app == RABBITMQ_APP else args.workers_namespace
    return {
        "apiVersion": API_VERSION,
        "kind": "PodMonitoring",
        "metadata": kube.metadata(name, app_labels(app, component), namespace),
        "spec": {
            "selector": {"matchLabels": selector_labels(app)},
            "endpoints": [dict(endpoint)],
        },
    }


def rabbitmq_pod_monitoring(args: MonitoringArgs) -> Manifest:
    return _pod_monitoring(
        args,
        METRICS_JOB,
        {
            "port": PROMETHEUS_PORT_NAME,
            "path": "/metrics",
            "interval": f"{args.monitoring.scrape_interval_seconds}s",
        },
        "metrics",
    )


def queue_pod_monitoring(args: MonitoringArgs) -> Manifest:
    # Per-queue series cost one series per queue and metric: only our vhost, only what
    # the rules read, and twice as seldom as the node metrics.
    return _pod_monitoring(
        args,
        QUEUES_JOB,
        {
            "port": PROMETHEUS_PORT_NAME,
            "path": "/metrics/detailed",
            "params": {"family": list(QUEUE_FAMILIES), "vhost": [args.vhost]},
            "interval": f"{2 * args.monitoring.scrape_interval_seconds}s",
        },
        "queue-metrics",
    )


def worker_pod_monitoring(args: MonitoringArgs) -> Manifest:
    """The workers' own counters (app/metrics.py), in their namespace."""
    return _pod_monitoring(
        args,
        WORKERS_JOB,
        {
            "port": METRICS_PORT_NAME,
            "path": "/metrics",
            "interval": f"{args.monitoring.scrape_interval_seconds}s",
        },
        "metrics",
        app=WORKER_APP,
    )


# --- alerts -----------------------------------------------------------------------


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    for_seconds: int
    severity: str  # "critical" pages, "warning" tickets
    summary: str
    runbook: str


def _duration(seconds: int) -> str:
    return f"{seconds // 60}m" if seconds % 60 == 0 and seconds else f"{seconds}s"


def _queue(args: MonitoringArgs, queue: str) -> str:
    return f'vhost="{args.vhost}", queue="{queue}"'


def recording_rules(args: MonitoringArgs) -> list[dict[str, str]]:
    """The work queue's depth and ack rate, summed over the pods that report it (a quorum
    queue's numbers come from its leader's node; after a failover, from another)."""
    work = _queue(args, args.queue)
    return [
        {
            "record": "celery:queue_messages_ready:sum",
            "expr": f"sum(rabbitmq_detailed_queue_messages_ready{{{work}}})",
        },
        {
            "record": "celery:queue_messages_unacked:sum",
            "expr": f"sum(rabbitmq_detailed_queue_messages_unacked{{{work}}})",
        },
        {
            "record": "celery:queue_acks:rate5m",
            "expr": f"sum(rate(rabbitmq_detailed_queue_messages_acked_total{{{work}}}[5m]))",
        },
    ]


def alerts(args: MonitoringArgs) -> list[Alert]:
    """Every alert, with what to do first when it fires."""
    m = args.monitoring
    dead = _queue(args, args.dead_letter_queue)
    work = _queue(args, args.queue)
    # Unacked messages may sit with a worker for its longest task; twice that, and at
    # least 10 minutes, without a single ack means the workers are stuck.
    stuck_seconds = max(600, 2 * args.longest_task_seconds)
    window = _duration(m.backlog_window_seconds)
    return [
        Alert(
            "RabbitMQNodeDown",
            f'(count(up{{job="{METRICS_JOB}"}} == 1) or vector(0)) < {args.replicas}',
            m.node_down_seconds,
            "critical",
            f"Fewer than {args.replicas} RabbitMQ pods answer their metrics scrape",
            f"kubectl -n {args.namespace} get pods -l app.kubernetes.io/name=rabbitmq; a pod "
            "Pending or CrashLooping: describe it and read its log; quorum queues keep working "
            "while a majority is up",
        ),
        Alert(
            "RabbitMQNodeNotClustered",
            "max by (pod) (rabbitmq_unreachable_cluster_peers_count) > 0",
            m.node_down_seconds,
            "critical",
            "A RabbitMQ node cannot reach {{ $value }} of its cluster peers",
            f"kubectl -n {args.namespace} exec rabbitmq-server-0 -- rabbitmq-diagnostics "
            "cluster_status on each pod; a partition heals by itself once the network does, a "
            "node that stays apart is restarted (delete its pod)",
        ),
        Alert(
            "RabbitMQMemoryAlarm",
            "max by (pod) (rabbitmq_alarms_memory_used_watermark) == 1",
            0,
            "critical",
            "RabbitMQ on {{ $labels.pod }} is over its memory watermark: publishers are blocked",
            "the scheduler and task publishers wait (nothing is lost, within their 120 s "
            "budget); find the growing queue (rabbitmq-diagnostics memory_breakdown), drain "
            "it or raise rabbitmq.resources.memoryLimit",
        ),
        Alert(
            "RabbitMQDiskAlarm",
            "max by (pod) (rabbitmq_alarms_free_disk_space_watermark) == 1",
            0,
            "critical",
            "RabbitMQ on {{ $labels.pod }} is under its free disk limit: publishers are blocked",
            "grow the pod's PVC (rabbitmq.storageSize) or drain the queues; "
            "rabbitmq-diagnostics status shows the limit and what is free",
        ),
        Alert(
            "CeleryBacklogGrowing",
            "celery:queue_messages_ready:sum > 0 "
            f"and deriv(celery:queue_messages_ready:sum[{window}]) > 0",
            m.backlog_window_seconds,
            "warning",
            f"The task backlog has grown for {window} (now {{{{ $value }}}} ready)",
            "more tasks arrive than the workers finish: add workers (workers.replicas) or "
            "find what made the tasks slower",
        ),
        Alert(
            "CeleryBacklogWaitHigh",
            "celery:queue_messages_ready:sum "
            "/ clamp_min(celery:queue_acks:rate5m, 0.001) "
            f"> {m.backlog_wait_seconds}",
            300,
            "warning",
            f"A task queued now would wait over {m.backlog_wait_seconds} s at the current "
            "completion rate",
            "the oldest tasks are that late: add workers, or pause the publishers; "
            "CeleryNoConsumer fires as well if nothing consumes at all",
        ),
        Alert(
            "CeleryDeadLetters",
            f"sum(rabbitmq_detailed_queue_messages{{{dead}}}) > 0",
            0,
            "warning",
            "{{ $value }} task(s) in the dead-letter queue: each crashed its worker "
            "delivery-limit times",
            "read them in the management UI (queue dead-letter, Get messages), fix the "
            "task, then move them back with a shovel or delete them",
        ),
        Alert(
            "CeleryNoConsumer",
            f"sum(rabbitmq_detailed_queue_consumers{{{work}}}) == 0",
            120,
            "critical",
            f"Nothing consumes the {args.queue} queue",
            f"kubectl -n {args.workers_namespace} get pods: no worker Ready, or every "
            "worker lost its connection; their logs say which",
        ),
        Alert(
            "CeleryUnackedStuck",
            "celery:queue_messages_unacked:sum > 0 and celery:queue_acks:rate5m == 0",
            stuck_seconds,
            "warning",
            "{{ $value }} task(s) delivered but not acknowledged, and no ack for "
            f"{_duration(stuck_seconds)}",
            "workers hold tasks without finishing any: a hung task or a frozen worker; "
            "restart the worker pods (late acks: their tasks are delivered again)",
        ),
    ]


def worker_alerts(args: MonitoringArgs) -> list[Alert]:
    """What the workers' own counters say (app/metrics.py)."""
    longest = args.longest_task_seconds
    return [
        Alert(
            "CeleryWorkerDown",
            f'up{{job="{WORKERS_JOB}"}} == 0',
            args.monitoring.worker_down_seconds,
            "warning",
            "Worker pod {{ $labels.pod }} does not answer its metrics scrape",
            f"kubectl -n {args.workers_namespace} describe pod {{{{ $labels.pod }}}}: "
            "restarting (liveness), OOMKilled or stuck; its tasks are redelivered to the "
            "others (late acks)",
        ),
        Alert(
            "CeleryTasksFailing",
            "sum by (task) (rate(celery_tasks_failed_total[10m])) "
            "/ clamp_min(sum by (task) (rate(celery_tasks_started_total[10m])), 0.001) > 0.05",
            600,
            "warning",
            "More than 5 % of {{ $labels.task }} tasks raise",
            f"kubectl -n {args.workers_namespace} logs -l app.kubernetes.io/name={WORKER_APP} "
            "--tail=500 and read the Tracebacks: a bug or a dependency down; a failed task is "
            "not retried unless it asks",
        ),
        Alert(
            "CeleryTasksRedelivered",
            "sum(rate(celery_tasks_redelivered_total[15m])) "
            "/ clamp_min(sum(rate(celery_tasks_received_total[15m])), 0.001) > 0.1",
            900,
            "warning",
            "Over 10 % of deliveries are redeliveries: workers die holding tasks",
            f"kubectl -n {args.workers_namespace} get pods: restarts or OOMKilled (raise "
            "workers.resources.memoryLimit), or spot nodes preempted; each redelivered "
            "task runs again (at-least-once)",
        ),
        Alert(
            "CeleryTaskRuntimeOverBudget",
            "histogram_quantile(0.95, sum by (task, le) "
            f"(rate(celery_task_runtime_seconds_bucket[15m]))) > {longest}",
            900,
            "warning",
            f"The slowest 5 % of {{{{ $labels.task }}}} tasks run over {longest} s "
            "(workers.longestTaskSeconds)",
            "the grace period a scale-in or rollout gives a worker is sized on "
            "workers.longestTaskSeconds: raise it, or find what made the tasks slower; "
            "a task cut off is redelivered and runs again",
        ),
    ]


def worker_rule_groups(args: MonitoringArgs) -> list[dict[str, Any]]:
    """The workers' group, in their namespace (GMP evaluates a namespace's Rules on
    that namespace's metrics only)."""
    return [
        {
            "name": "celery-workers",
            "interval": f"{args.monitoring.scrape_interval_seconds}s",
            "rules": [_alert_rule(alert) for alert in worker_alerts(args)],
        }
    ]


def rule_groups(args: MonitoringArgs) -> list[dict[str, Any]]:
    """The rule groups, as both ``Rules.spec.groups`` and a Prometheus rule file have them.

    One group: its rules are evaluated in order, so the alerts read what the recording
    rules recorded at the same evaluation (across groups they could lag one interval).
    """
    return [
        {
            "name": "celery-cluster",
            "interval": f"{args.monitoring.scrape_interval_seconds}s",
            "rules": [*recording_rules(args), *(_alert_rule(alert) for alert in alerts(args))],
        },
    ]


def _alert_rule(alert: Alert) -> dict[str, Any]:
    rule: dict[str, Any] = {"alert": alert.name, "expr": alert.expr}
    if alert.for_seconds:
        rule["for"] = _duration(alert.for_seconds)
    rule["labels"] = {"severity": alert.severity}
    rule["annotations"] = {"summary": alert.summary, "runbook": alert.runbook}
    return rule


def _rules(name: str, app: str, namespace: str, groups: list[dict[str, Any]]) -> Manifest:
    return {
        "apiVersion": API_VERSION,
        "kind": "Rules",
        "metadata": kube.metadata(name, app_labels(app, "alerts"), namespace),
        "spec": {"groups": groups},
    }


def rules(args: MonitoringArgs) -> Manifest:
    return _rules(RULES_NAME, RABBITMQ_APP, args.namespace, rule_groups(args))


def worker_rules(args: MonitoringArgs) -> Manifest:
    return _rules(WORKER_RULES_NAME, WORKER_APP, args.workers_namespace, worker_rule_groups(args))


def objects(args: MonitoringArgs) -> Sequence[Manifest]:
    found = [rabbitmq_pod_monitoring(args), queue_pod_monitoring(args), rules(args)]
    if args.worker_metrics:
        found += [worker_pod_monitoring(args), worker_rules(args)]
    return found


# --- registration -----------------------------------------------------------------


class Monitoring(pulumi.ComponentResource):
    """The PodMonitoring and Rules objects, in RabbitMQ's and the workers' namespaces."""

    def __init__(
        self,
        name: str,
        args: MonitoringArgs,
        provider: k8s.Provider,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("celerycluster:monitoring:Monitoring", name, {}, opts)
        child = pulumi.ResourceOptions(parent=self, provider=provider)
        for manifest in objects(args):
            kube.register_custom(f"{name}-{manifest['metadata']['name']}", manifest, child)
        self.register_outputs({})
