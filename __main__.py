"""A reliable Celery worker cluster: config -> GKE -> RabbitMQ -> workers -> exports."""

import pulumi

from components import config as stack_config
from components.autoscaling import AutoscalingArgs, WorkerAutoscaling
from components.gke import GkeCluster, GkeClusterArgs, existing_cluster_provider
from components.monitoring import Monitoring, MonitoringArgs
from components.rabbitmq import VHOST, RabbitmqCluster, RabbitmqClusterArgs
from components.worker_image import worker_image
from components.workers import CeleryWorkers, CeleryWorkersArgs

# Validated before anything is created: a bad key or value stops here.
config = stack_config.load()

if config.target == "gke":
    gke = GkeCluster("celery", GkeClusterArgs.from_stack(config))
    provider = gke.provider
    pulumi.export("cluster_name", gke.cluster_name)
    pulumi.export("endpoint", gke.endpoint)
    pulumi.export("kubeconfig", gke.kubeconfig)
else:
    provider = existing_cluster_provider(config)

rabbitmq = RabbitmqCluster("rabbitmq", RabbitmqClusterArgs.from_stack(config), provider)
workers = CeleryWorkers(
    "workers",
    CeleryWorkersArgs.from_stack(config),
    provider,
    rabbitmq.broker_urls,
    worker_image(config),
    broker=rabbitmq.server,
)
if config.autoscaled:
    assert rabbitmq.monitor_password is not None  # created with autoscaling
    WorkerAutoscaling(
        "autoscaling",
        AutoscalingArgs.from_stack(config, rabbitmq.management_url),
        provider,
        rabbitmq.monitor_password,
        workers.deployment,
    )
if config.monitoring.managed_prometheus:
    Monitoring(
        "monitoring",
        MonitoringArgs.from_stack(config, VHOST),
        provider,
        pulumi.ResourceOptions(depends_on=[rabbitmq.namespace_object, workers.namespace_object]),
    )

pulumi.export("broker_urls", rabbitmq.broker_urls)
pulumi.export("rabbitmq_namespace", rabbitmq.namespace)
pulumi.export("workers_namespace", workers.namespace)
pulumi.export(
    "management_ui",
    f"kubectl -n {config.rabbitmq.namespace} port-forward svc/rabbitmq 15672:15672",
)
