"""Workers that follow the queue: KEDA scales the worker Deployment on the work
queue's depth (ready AND unacknowledged messages).

One small function per object, as in :mod:`components.rabbitmq`:

* :func:`keda_release`: KEDA itself, from its Helm chart at the pinned
  ``autoscaling.kedaChartVersion`` (``autoscaling.keda: install``; ``existing`` uses
  one already installed, ``none`` keeps ``workers.replicas`` fixed);
* :func:`monitor_secret`: the management API's address and the credentials of
  RabbitMQ's ``keda-scaler`` user (``management`` tag, no permission on any resource;
  components/rabbitmq_conf.py), in the workers' namespace;
* :func:`trigger_authentication`: hands that Secret to KEDA's scaler;
* :func:`scaled_object`: the ``rabbitmq`` trigger, ``protocol: http`` (only the
  management API counts unacknowledged messages), ``mode: QueueLength``.

The scaler asks ``GET /api/queues/<vhost>/<queue>`` and reads ``messages``
(ready + unacknowledged); :func:`queue_depth_url` is that request, and
tests/integration/test_metrics_endpoint.py sends it to the pod twin's RabbitMQ with
the rendered Secret's credentials.

Scale-in loses no task: the HPA deletes a worker pod, which gets SIGTERM and the
Deployment's grace period (longer than the longest task: components/workers.py),
Celery's warm shutdown finishes the running tasks, and what it held unstarted is
unacknowledged (late acks) and goes back to the queue when its connection closes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus, urlsplit

import pulumi
import pulumi_kubernetes as k8s

from app.settings import DEFAULT_QUEUE
from components import kube
from components.config import AutoscalingConfig, StackConfig
from components.kube import Manifest
from components.names import WORKER_APP, app_labels
from components.rabbitmq import MONITOR_USERNAME, VHOST, secret_data
from components.workers import DEPLOYMENT

API_VERSION = "keda.sh/v1alpha1"
KEDA_CHART = "keda"
KEDA_REPOSITORY = "https://kedacore.github.io/charts"
SCALED_OBJECT = "celery-worker"
TRIGGER_AUTHENTICATION = "rabbitmq-queue-monitor"
MONITOR_SECRET = "rabbitmq-queue-monitor"
# The Secret's keys, as the scaler's TriggerAuthentication parameters are named.
HOST_KEY, USERNAME_KEY, PASSWORD_KEY = "host", "username", "password"


@dataclass(frozen=True)
class AutoscalingArgs:
    """What the KEDA objects need from the stack."""

    autoscaling: AutoscalingConfig
    namespace: str  # the workers'
    messages_per_replica: int
    vhost: str
    management_url: str  # the vhost as its path (components.rabbitmq.management_url)
    monitor_username: str
    queue: str = DEFAULT_QUEUE

    @classmethod
    def from_stack(cls, config: StackConfig, management_url: str) -> AutoscalingArgs:
        return cls(
            autoscaling=config.autoscaling,
            namespace=config.workers.namespace,
            messages_per_replica=config.messages_per_replica,
            vhost=VHOST,
            management_url=management_url,
            monitor_username=MONITOR_USERNAME,
        )

    @property
    def installs_keda(self) -> bool:
        return self.autoscaling.keda == "install"


def queue_depth_url(host: str, vhost_name: str, queue: str) -> str:
    """The URL KEDA's rabbitmq scaler (2.20, ``protocol: http``, no regex) requests,
    credentials aside (it sends them as basic auth): the host's last path segment is
    the vhost unless ``vhostName`` is set, the segments before it stay a path prefix."""
    parts = urlsplit(host)
    *prefix, last = (parts.path or "/").split("/")
    vhost = "/" + (quote_plus(vhost_name) if vhost_name else last)
    if vhost == "/":
        vhost = "/%2F"  # the default vhost
    base = "/".join(p for p in prefix if p)
    root = f"{parts.scheme}://{parts.netloc}" + (f"/{base}" if base else "")
    return f"{root}/api/queues{vhost}/{quote_plus(queue)}"


def keda_values(args: AutoscalingArgs) -> dict[str, Any]:
    """The chart's values: KEDA watches the workers' namespace only."""
    return {"watchNamespace": args.namespace}


def keda_release(
    name: str, args: AutoscalingArgs, opts: pulumi.ResourceOptions
) -> k8s.helm.v3.Release:
    scaling = args.autoscaling
    return k8s.helm.v3.Release(
        name,
        name="keda",
        chart=KEDA_CHART,
        version=scaling.keda_chart_version,
        repository_opts=k8s.helm.v3.RepositoryOptsArgs(repo=KEDA_REPOSITORY),
        namespace=scaling.keda_namespace,
        create_namespace=True,
        values=keda_values(args),
        # Awaited: the ScaledObject needs KEDA's CRDs and its admission webhook up.
        skip_await=False,
        atomic=True,
        opts=opts,
    )


def monitor_secret_data(args: AutoscalingArgs, password: str) -> dict[str, str]:
    """Base64 ``data``, as the RabbitMQ Secret's (server-side apply tracks it)."""
    return secret_data(
        {HOST_KEY: args.management_url, USERNAME_KEY: args.monitor_username, PASSWORD_KEY: password}
    )


def monitor_secret(args: AutoscalingArgs, data: pulumi.Input[Mapping[str, str]]) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": kube.metadata(
            MONITOR_SECRET, app_labels(WORKER_APP, "autoscaling"), args.namespace
        ),
        "type": "Opaque",
        "data": data,
    }


def trigger_authentication(args: AutoscalingArgs) -> Manifest:
    return {
        "apiVersion": API_VERSION,
        "kind": "TriggerAuthentication",
        "metadata": kube.metadata(
            TRIGGER_AUTHENTICATION, app_labels(WORKER_APP, "autoscaling"), args.namespace
        ),
        "spec": {
            "secretTargetRef": [
                {"parameter": key, "name": MONITOR_SECRET, "key": key}
                for key in (HOST_KEY, USERNAME_KEY, PASSWORD_KEY)
            ]
        },
    }


def scaled_object(args: AutoscalingArgs) -> Manifest:
    scaling = args.autoscaling
    return {
        "apiVersion": API_VERSION,
        "kind": "ScaledObject",
        "metadata": kube.metadata(
            SCALED_OBJECT, app_labels(WORKER_APP, "autoscaling"), args.namespace
        ),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": DEPLOYMENT},
            "pollingInterval": scaling.polling_interval_seconds,
            # KEDA's cooldownPeriod only applies to scaling to zero, which minReplicas
            # >= 1 rules out; the HPA's stabilization window is what delays scale-in.
            "cooldownPeriod": scaling.cooldown_seconds,
            "minReplicaCount": scaling.min_replicas,
            "maxReplicaCount": scaling.max_replicas,
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "behavior": {
                        "scaleDown": {"stabilizationWindowSeconds": scaling.cooldown_seconds}
                    }
                }
            },
            "triggers": [
                {
                    "type": "rabbitmq",
                    "metadata": {
                        # Only the management API counts unacknowledged messages: with
                        # late acks and prefetch, a busy worker's tasks are unacked.
                        "protocol": "http",
                        "mode": "QueueLength",
                        "value": str(args.messages_per_replica),
                        "queueName": args.queue,
                        "vhostName": args.vhost,
                        "excludeUnacknowledged": "false",
                    },
                    "authenticationRef": {"name": TRIGGER_AUTHENTICATION},
                }
            ],
        },
    }


class WorkerAutoscaling(pulumi.ComponentResource):
    """KEDA (installed or not) and the ScaledObject on the worker Deployment."""

    def __init__(
        self,
        name: str,
        args: AutoscalingArgs,
        provider: k8s.Provider,
        monitor_password: pulumi.Input[str],
        deployment: pulumi.Resource,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("celerycluster:autoscaling:WorkerAutoscaling", name, {}, opts)
        child = pulumi.ResourceOptions(parent=self, provider=provider)
        needs: list[pulumi.Resource] = [deployment]
        if args.installs_keda:
            needs.append(keda_release(f"{name}-keda", args, child))
        password: pulumi.Output[str] = pulumi.Output.from_input(monitor_password)
        data: pulumi.Output[dict[str, str]] = password.apply(lambda p: monitor_secret_data(args, p))
        secret = kube.register(
            f"{name}-monitor", monitor_secret(args, pulumi.Output.secret(data)), child
        )
        after = pulumi.ResourceOptions.merge(
            child, pulumi.ResourceOptions(depends_on=[*needs, secret])
        )
        auth = kube.register_custom(f"{name}-auth", trigger_authentication(args), after)
        kube.register_custom(
            f"{name}-scaled-object",
            scaled_object(args),
            pulumi.ResourceOptions.merge(after, pulumi.ResourceOptions(depends_on=[auth])),
        )
        self.register_outputs({})
