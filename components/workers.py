"""Celery workers on Kubernetes: a Deployment that loses no task, and the scheduler Job.

One small function per Kubernetes object returning its manifest (a plain,
camelCase dict, schema-checked in the tests); `CeleryWorkers` registers them.
The Celery settings themselves are not here: the worker computes them from
its environment with `app.settings.celery_config`, the same function the
local tests boot.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_kubernetes as k8s

from app.settings import ENV_BROKER_URLS, ENV_CONCURRENCY, ENV_METRICS_PORT, ENV_POOL
from components import kube
from components.config import SchedulerConfig, StackConfig, WorkersConfig
from components.kube import Manifest
from components.names import (
    AMQP_CLIENT_LABEL,
    BROKER_URLS_KEY,
    SCHEDULER_APP,
    WORKER_APP,
    WORKER_POOL,
    app_labels,
    pool_placement,
    selector_labels,
)

BROKER_SECRET = "celery-broker"
SERVICE_ACCOUNT = "celery-worker"
APP_UID = 10001
SCHEDULER_JOB = "celery-scheduler"
# The scheduler publishes a few thousand confirmed tasks a second and retries a
# broker outage for its own budget; past this the Job (and `pulumi up`) fails.
SCHEDULER_DEADLINE_SECONDS = 15 * 60
DEPLOYMENT = "celery-worker"
#: app.metrics' /metrics (prometheus_client), the container port named "metrics".
METRICS_PORT = 9808
METRICS_PORT_NAME = "metrics"


@dataclass(frozen=True)
class CeleryWorkersArgs:
    """What the workers component needs from the stack (Pulumi's ``*Args`` convention)."""

    workers: WorkersConfig
    # On the workers' own node pool (gke.workerPool on).
    dedicated_pool: bool = False
    # A KEDA ScaledObject owns the replica count (components/autoscaling.py).
    autoscaled: bool = False

    @classmethod
    def from_stack(cls, config: StackConfig) -> CeleryWorkersArgs:
        return cls(
            workers=config.workers,
            dedicated_pool=config.dedicated_pools,
            autoscaled=config.autoscaled,
        )


def _placement(args: CeleryWorkersArgs) -> Manifest:
    return pool_placement(WORKER_POOL) if args.dedicated_pool else {}


def namespace(args: CeleryWorkersArgs) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": kube.metadata(args.workers.namespace, app_labels(WORKER_APP, "namespace")),
    }


def broker_secret(args: CeleryWorkersArgs, broker_urls: pulumi.Input[Sequence[str]]) -> Manifest:
    """The failover list, credentials inside: never plain text in the Deployment."""
    joined: pulumi.Output[str] = pulumi.Output.from_input(broker_urls).apply(",".join)
    urls: pulumi.Output[str] = pulumi.Output.secret(joined)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": kube.metadata(
            BROKER_SECRET, app_labels(WORKER_APP, "broker"), args.workers.namespace
        ),
        "type": "Opaque",
        "stringData": {BROKER_URLS_KEY: urls},
    }


def service_account(args: CeleryWorkersArgs) -> Manifest:
    # Workers never call the Kubernetes API: no token in the pod.
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": kube.metadata(
            SERVICE_ACCOUNT, app_labels(WORKER_APP, "worker"), args.workers.namespace
        ),
        "automountServiceAccountToken": False,
    }


def _broker_env() -> list[Manifest]:
    return [
        {
            "name": ENV_BROKER_URLS,
            "valueFrom": {"secretKeyRef": {"name": BROKER_SECRET, "key": BROKER_URLS_KEY}},
        }
    ]


def worker_command() -> list[str]:
    # Pool and concurrency come from the environment, through
    # app.settings.celery_config (which also tunes other settings to the pool).
    return [
        "celery",
        "--app=app.celery",
        "worker",
        "--loglevel=INFO",
        # The pod name: unique per replica, and what the broker-list rotation hashes.
        "--hostname=celery@%h",
        # Neither is needed to consume tasks, and after a broker failover mingle's
        # neighbour sync held the consumer ~22 s on the pod twin (RabbitMQ 4.3.6:
        # a broker pod SIGKILLed, `make local`), while every task waited.
        "--without-mingle",
        "--without-gossip",
    ]


def deployment(args: CeleryWorkersArgs, image: pulumi.Input[str]) -> Manifest:
    workers = args.workers
    labels = {**app_labels(WORKER_APP, "worker"), AMQP_CLIENT_LABEL: "true"}
    spread = [
        {
            "maxSkew": 1,
            "topologyKey": key,
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": selector_labels(WORKER_APP)},
        }
        for key in ("kubernetes.io/hostname", "topology.kubernetes.io/zone")
    ]
    env: list[Manifest] = [
        *_broker_env(),
        {"name": ENV_POOL, "value": workers.pool},
        {"name": ENV_CONCURRENCY, "value": str(workers.concurrency)},
    ]
    metrics: Manifest = {}
    if workers.serves_metrics:
        env.append({"name": ENV_METRICS_PORT, "value": str(METRICS_PORT)})
        metrics["ports"] = [
            {"name": METRICS_PORT_NAME, "containerPort": METRICS_PORT, "protocol": "TCP"}
        ]
    container = {
        "name": "worker",
        "image": image,
        "command": worker_command(),
        "env": env,
        **metrics,
        "resources": workers.resources.to_kubernetes(),
        "securityContext": kube.container_security_context(),
        # A worker whose consumer loop is wedged stops refreshing its heartbeat
        # file; the check never talks to the broker, so a broker failover does
        # not restart healthy workers.
        "livenessProbe": {
            "exec": {"command": ["python", "-m", "app.liveness", "--max-age", "60"]},
            "initialDelaySeconds": 30,
            "periodSeconds": 30,
            "timeoutSeconds": 10,
            "failureThreshold": 3,
        },
        # Ready once the worker has booted far enough to run its consumer loop (the
        # heartbeat file, in a per-pod emptyDir, exists and is fresh): a rollout
        # (maxUnavailable 0) stops an old worker only after its replacement got there.
        "readinessProbe": {
            "exec": {"command": ["python", "-m", "app.liveness", "--max-age", "60"]},
            "initialDelaySeconds": 5,
            "periodSeconds": 10,
            "timeoutSeconds": 10,
            "failureThreshold": 3,
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    # Autoscaled: no replica count here, or every `pulumi up` would reset what KEDA's
    # HorizontalPodAutoscaler chose.
    replicas = {} if args.autoscaled else {"replicas": workers.replicas}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": kube.metadata(DEPLOYMENT, labels, workers.namespace),
        "spec": {
            **replicas,
            "selector": {"matchLabels": selector_labels(WORKER_APP)},
            # Never below the wanted capacity during a rollout: surge first.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": SERVICE_ACCOUNT,
                    "automountServiceAccountToken": False,
                    # SIGTERM starts Celery's warm shutdown: no new tasks, the
                    # running ones finish. The grace period outlasts the longest task.
                    "terminationGracePeriodSeconds": workers.termination_grace_seconds,
                    "securityContext": kube.pod_security_context(APP_UID),
                    "topologySpreadConstraints": spread,
                    **_placement(args),
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
                },
            },
        },
    }


def pod_disruption_budget(args: CeleryWorkersArgs) -> Manifest:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": kube.metadata(
            DEPLOYMENT, app_labels(WORKER_APP, "worker"), args.workers.namespace
        ),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(WORKER_APP)}},
    }


def network_policy(args: CeleryWorkersArgs) -> Manifest:
    """Workers and the scheduler serve nothing but the workers' metrics: no other ingress."""
    spec: Manifest = {"podSelector": {}, "policyTypes": ["Ingress"]}
    if args.workers.serves_metrics:
        spec["ingress"] = [
            {
                # Managed Prometheus' collectors (gmp-system) scrape; any namespace may.
                "from": [{"namespaceSelector": {}}],
                "ports": [{"protocol": "TCP", "port": METRICS_PORT}],
            }
        ]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": kube.metadata(
            "deny-ingress", app_labels(WORKER_APP, "network"), args.workers.namespace
        ),
        "spec": spec,
    }


def scheduler_run_key(scheduler: SchedulerConfig) -> str:
    """What identifies one scheduler run: its own settings, never the image.

    The Job is named after it, so a new worker image leaves a finished run alone
    and only a change of these (e.g. a new ``runId``) enqueues the tasks again.
    """
    own = {
        "runId": scheduler.run_id,
        "tasks": scheduler.tasks,
        "taskSeconds": scheduler.task_seconds,
    }
    return hashlib.sha256(json.dumps(own, sort_keys=True).encode()).hexdigest()[:8]


def scheduler_job(args: CeleryWorkersArgs, image: pulumi.Input[str]) -> Manifest:
    """The article's scheduler (a bare Pod there): enqueue `tasks` count tasks once."""
    scheduler = args.workers.scheduler
    labels = {**app_labels(SCHEDULER_APP, "scheduler"), AMQP_CLIENT_LABEL: "true"}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": kube.metadata(
            f"{SCHEDULER_JOB}-{scheduler_run_key(scheduler)}", labels, args.workers.namespace
        ),
        "spec": {
            # A retried scheduler would enqueue every task again: run once. A
            # failure fails `pulumi up` (the Job is awaited), it is not retried.
            "backoffLimit": 0,
            "activeDeadlineSeconds": SCHEDULER_DEADLINE_SECONDS,
            # No ttlSecondsAfterFinished: a Job deleted by its TTL would be
            # re-created by the next `pulumi up` after a refresh, enqueuing again.
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    **_placement(args),
                    "serviceAccountName": SERVICE_ACCOUNT,
                    "automountServiceAccountToken": False,
                    "securityContext": kube.pod_security_context(APP_UID),
                    "containers": [
                        {
                            "name": "scheduler",
                            "image": image,
                            "command": [
                                "python",
                                "-m",
                                "app.scheduler",
                                f"--tasks={scheduler.tasks}",
                                f"--task-seconds={scheduler.task_seconds:g}",
                                f"--window={scheduler.publish_window}",
                            ],
                            "env": _broker_env(),
                            "resources": args.workers.resources.to_kubernetes(),
                            "securityContext": kube.container_security_context(),
                        }
                    ],
                },
            },
        },
    }


def scheduler_options(args: CeleryWorkersArgs) -> pulumi.ResourceOptions:
    """Awaited (a failed run fails `pulumi up`), and never updated in place."""
    return pulumi.ResourceOptions(
        # The name carries the run key: a changed run is a new resource. Anything
        # else in the spec (the image digest above all) must not touch a finished run.
        ignore_changes=["spec"],
        custom_timeouts=pulumi.CustomTimeouts(create=f"{SCHEDULER_DEADLINE_SECONDS // 60 + 5}m"),
    )


class CeleryWorkers(pulumi.ComponentResource):
    """Celery workers (Deployment + PDB), their broker Secret, and the scheduler Job."""

    namespace: str

    def __init__(
        self,
        name: str,
        args: CeleryWorkersArgs,
        provider: k8s.Provider,
        broker_urls: pulumi.Input[Sequence[str]],
        image: pulumi.Input[str],
        broker: pulumi.Resource | None = None,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        """``broker``: the RabbitMQ resource the scheduler must wait for (awaited Ready)."""
        super().__init__("celerycluster:workers:CeleryWorkers", name, {}, opts)
        self.namespace = args.workers.namespace
        child = pulumi.ResourceOptions(parent=self, provider=provider)

        ns = kube.register(f"{name}-namespace", namespace(args), child)
        self.namespace_object = ns  # what objects placed in this namespace depend on
        in_ns = pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=[ns]))
        secret = kube.register(f"{name}-broker", broker_secret(args, broker_urls), in_ns)
        account = kube.register(f"{name}-account", service_account(args), in_ns)
        ready = pulumi.ResourceOptions.merge(
            in_ns, pulumi.ResourceOptions(depends_on=[secret, account])
        )
        self.deployment = kube.register(f"{name}-deployment", deployment(args, image), ready)
        kube.register(f"{name}-pdb", pod_disruption_budget(args), in_ns)
        kube.register(f"{name}-deny-ingress", network_policy(args), in_ns)
        scheduler = args.workers.scheduler
        if scheduler.enabled:
            # After the workers (the first tasks are picked up at once) and after
            # every RabbitMQ pod is Ready.
            waits_for: list[pulumi.Resource] = [self.deployment]
            if broker is not None:
                waits_for.append(broker)
            kube.register(
                f"{name}-scheduler-{scheduler_run_key(scheduler)}",
                scheduler_job(args, image),
                pulumi.ResourceOptions.merge(
                    ready,
                    pulumi.ResourceOptions.merge(
                        scheduler_options(args), pulumi.ResourceOptions(depends_on=waits_for)
                    ),
                ),
            )
        self.register_outputs({"namespace": self.namespace})
