"""Names and labels that more than one component must agree on."""

PART_OF = "celery-cluster"

RABBITMQ_APP = "rabbitmq"
WORKER_APP = "celery-worker"
SCHEDULER_APP = "celery-scheduler"

# Pods carrying this label (in the workers namespace) may open AMQP
# connections to RabbitMQ; the RabbitMQ NetworkPolicy admits nobody else.
AMQP_CLIENT_LABEL = "celery-cluster/amqp-client"

# Secret keys shared between the RabbitMQ component and the workers.
BROKER_URLS_KEY = "broker-urls"


def app_labels(app: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": app,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": PART_OF,
        "app.kubernetes.io/managed-by": "pulumi",
    }


def selector_labels(app: str) -> dict[str, str]:
    """The stable subset used in selectors (selectors are immutable)."""
    return {"app.kubernetes.io/name": app}


# GCP label (on the persistent disks the RabbitMQ StorageClass provisions) whose
# value is the stack name: what `make destroy` lists to find disks that outlived it.
STACK_LABEL = "celery-cluster-stack"


# Node pools (when gke.workerPool is on): a node label on each pool, and a taint on
# RabbitMQ's, so only what tolerates it (the RabbitMQ StatefulSet) runs there.
POOL_LABEL = "celery-cluster/pool"
RABBITMQ_POOL = "rabbitmq"
WORKER_POOL = "workers"


def pool_placement(pool: str, *, tolerate: bool = False) -> dict[str, object]:
    """The pod spec fields that put a pod on ``pool`` (and let it past the pool's taint)."""
    placement: dict[str, object] = {"nodeSelector": {POOL_LABEL: pool}}
    if tolerate:
        placement["tolerations"] = [
            {"key": POOL_LABEL, "operator": "Equal", "value": pool, "effect": "NoSchedule"}
        ]
    return placement
