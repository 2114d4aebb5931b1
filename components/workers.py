"""Celery workers on Kubernetes: a Deployment that loses no task, and the scheduler Job.

One small function per Kubernetes object returning its manifest (a plain,
camelCase dict, schema-checked in the tests); `CeleryWorkers` registers them.
The Celery settings themselves are not here: the worker computes them from
its environment with `app.settings.celery_config`, the same function the
local tests boot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from components.config import StackConfig
from components.names import (
    AMQP_CLIENT_LABEL,
    BROKER_URLS_KEY,
    SCHEDULER_APP,
    WORKER_APP,
    app_labels,
    selector_labels,
)

BROKER_SECRET = "celery-broker"
SERVICE_ACCOUNT = "celery-worker"
APP_UID = 10001

Manifest = dict[str, Any]


def _metadata(name: str, namespace: str, labels: dict[str, str], **extra: Any) -> Manifest:
    return {"name": name, "namespace": namespace, "labels": labels, **extra}


def namespace(config: StackConfig) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": config.workers.namespace,
            "labels": app_labels(WORKER_APP, "namespace"),
        },
    }


def broker_secret(config: StackConfig, broker_urls: pulumi.Input[Sequence[str]]) -> Manifest:
    """The failover list, credentials inside: never plain text in the Deployment."""
    joined: pulumi.Output[str] = pulumi.Output.from_input(broker_urls).apply(",".join)
    urls: pulumi.Output[str] = pulumi.Output.secret(joined)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(
            BROKER_SECRET, config.workers.namespace, app_labels(WORKER_APP, "broker")
        ),
        "type": "Opaque",
        "stringData": {BROKER_URLS_KEY: urls},
    }


def service_account(config: StackConfig) -> Manifest:
    # Workers never call the Kubernetes API: no token in the pod.
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(
            SERVICE_ACCOUNT, config.workers.namespace, app_labels(WORKER_APP, "worker")
        ),
        "automountServiceAccountToken": False,
    }


def _pod_security_context() -> Manifest:
    return {
        "runAsNonRoot": True,
        "runAsUser": APP_UID,
        "runAsGroup": APP_UID,
        "fsGroup": APP_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security_context() -> Manifest:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _broker_env() -> list[Manifest]:
    return [
        {
            "name": "CELERY_BROKER_URLS",
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
    ]


def deployment(config: StackConfig, image: pulumi.Input[str]) -> Manifest:
    workers = config.workers
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
    container = {
        "name": "worker",
        "image": image,
        "command": worker_command(),
        "env": [
            *_broker_env(),
            {"name": "CELERY_POOL", "value": workers.pool},
            {"name": "CELERY_CONCURRENCY", "value": str(workers.concurrency)},
        ],
        "resources": workers.resources.to_kubernetes(),
        "securityContext": _container_security_context(),
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
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata("celery-worker", workers.namespace, labels),
        "spec": {
            "replicas": workers.replicas,
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
                    "securityContext": _pod_security_context(),
                    "topologySpreadConstraints": spread,
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
                },
            },
        },
    }


def pod_disruption_budget(config: StackConfig) -> Manifest:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(
            "celery-worker", config.workers.namespace, app_labels(WORKER_APP, "worker")
        ),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(WORKER_APP)}},
    }


def network_policy(config: StackConfig) -> Manifest:
    """Workers and the scheduler serve nothing: no ingress at all."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(
            "deny-ingress", config.workers.namespace, app_labels(WORKER_APP, "network")
        ),
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    }


def scheduler_job(config: StackConfig, image: pulumi.Input[str]) -> Manifest:
    """The article's scheduler (a bare Pod there): enqueue `tasks` count tasks once."""
    scheduler = config.workers.scheduler
    labels = {**app_labels(SCHEDULER_APP, "scheduler"), AMQP_CLIENT_LABEL: "true"}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(
            "celery-scheduler",
            config.workers.namespace,
            labels,
            # Publishing 10,000 confirmed tasks outlasts Pulumi's default await.
            annotations={"pulumi.com/skipAwait": "true"},
        ),
        "spec": {
            # A retried scheduler would enqueue every task again: run once.
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": 86400,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "serviceAccountName": SERVICE_ACCOUNT,
                    "automountServiceAccountToken": False,
                    "securityContext": _pod_security_context(),
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
                            ],
                            "env": _broker_env(),
                            "resources": config.workers.resources.to_kubernetes(),
                            "securityContext": _container_security_context(),
                        }
                    ],
                },
            },
        },
    }


class CeleryWorkers(pulumi.ComponentResource):
    """Celery workers (Deployment + PDB), their broker Secret, and the scheduler Job."""

    namespace: str

    def __init__(
        self,
        name: str,
        config: StackConfig,
        provider: k8s.Provider,
        broker_urls: pulumi.Input[Sequence[str]],
        image: pulumi.Input[str],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("celerycluster:workers:CeleryWorkers", name, {}, opts)
        self.namespace = config.workers.namespace
        child = pulumi.ResourceOptions(parent=self, provider=provider)

        ns = namespace(config)
        ns_resource = k8s.core.v1.Namespace(
            f"{name}-namespace", metadata=ns["metadata"], opts=child
        )
        in_ns = pulumi.ResourceOptions.merge(
            child, pulumi.ResourceOptions(depends_on=[ns_resource])
        )

        secret = broker_secret(config, broker_urls)
        secret_resource = k8s.core.v1.Secret(
            f"{name}-broker",
            metadata=secret["metadata"],
            type=secret["type"],
            string_data=secret["stringData"],
            opts=in_ns,
        )
        account = service_account(config)
        account_resource = k8s.core.v1.ServiceAccount(
            f"{name}-account",
            metadata=account["metadata"],
            automount_service_account_token=account["automountServiceAccountToken"],
            opts=in_ns,
        )
        ready = pulumi.ResourceOptions.merge(
            in_ns, pulumi.ResourceOptions(depends_on=[secret_resource, account_resource])
        )

        workload = deployment(config, image)
        self.deployment = k8s.apps.v1.Deployment(
            f"{name}-deployment", metadata=workload["metadata"], spec=workload["spec"], opts=ready
        )
        budget = pod_disruption_budget(config)
        k8s.policy.v1.PodDisruptionBudget(
            f"{name}-pdb", metadata=budget["metadata"], spec=budget["spec"], opts=in_ns
        )
        policy = network_policy(config)
        k8s.networking.v1.NetworkPolicy(
            f"{name}-deny-ingress", metadata=policy["metadata"], spec=policy["spec"], opts=in_ns
        )
        if config.workers.scheduler.enabled:
            job = scheduler_job(config, image)
            # After the workers, so the first tasks are picked up at once.
            k8s.batch.v1.Job(
                f"{name}-scheduler",
                metadata=job["metadata"],
                spec=job["spec"],
                opts=pulumi.ResourceOptions.merge(
                    ready, pulumi.ResourceOptions(depends_on=[self.deployment])
                ),
            )
        self.register_outputs({"namespace": self.namespace})
