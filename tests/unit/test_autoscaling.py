"""Autoscaling under Pulumi's mocks, every stack: KEDA (components/autoscaling.py), the
node pools (components/gke.py), and where each workload is placed.

ScaledObject and TriggerAuthentication are KEDA's CRDs, not in Kubernetes' own schema,
and no package here ships their schema: each field the program sets is checked here
against what KEDA 2.20's CRDs (keda.sh/v1alpha1) allow and against the objects it must
agree with (the worker Deployment, the Secret, RabbitMQ's definitions).
"""

from __future__ import annotations

import base64
import json
from functools import cache
from typing import Any

import pytest

from app.settings import WorkerSettings, celery_config
from components import autoscaling, rabbitmq
from components.config import KEDA_CHART_VERSION, ConfigError, load_stack_config
from components.names import POOL_LABEL
from components.rabbitmq_conf import rabbitmq_password_hash
from tools.mockrun import ProgramRun, reveal, run_program, stack_config, stack_names

STACKS = stack_names()
NODE_POOL = "gcp:container/nodePool:NodePool"
# What KEDA 2.20's CRDs allow in the fields the program sets.
SCALED_OBJECT_SPEC = {
    "scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
    "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced",
    "triggers",
}  # fmt: skip
SCALE_TARGET_REF = {"apiVersion", "kind", "name", "envSourceContainerName"}
TRIGGER = {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}
RABBITMQ_TRIGGER_METADATA = {
    "host", "protocol", "mode", "value", "activationValue", "queueName", "vhostName",
    "useRegex", "excludeUnacknowledged", "pageSize", "operation", "timeout", "unsafeSsl",
}  # fmt: skip
SECRET_TARGET_REF = {"parameter", "name", "key"}
# The rabbitmq scaler's TriggerAuthentication parameters.
RABBITMQ_AUTH_PARAMETERS = {"host", "username", "password", "vhostName", "tls", "ca", "cert", "key"}


@cache
def _run(stack: str) -> ProgramRun:
    return _run_with(stack)


def _run_with(stack: str, **changes: Any) -> ProgramRun:
    raw = stack_config(stack)
    for key, value in changes.items():
        full = f"celery-cluster:{key}"
        raw[full] = {**raw.get(full, {}), **value}
    run = run_program(raw, stack)
    assert run.error is None, run.error
    return run


def _objects(run: ProgramRun, kind: str) -> list[dict[str, Any]]:
    return [reveal(m) for _, m in run.kubernetes_objects() if m["kind"] == kind]


def _config(stack: str) -> Any:
    return load_stack_config(stack_config(stack), stack)


@pytest.mark.parametrize("stack", STACKS)
def test_the_scaled_object_targets_the_worker_deployment_with_the_stacks_bounds(
    stack: str,
) -> None:
    run, config = _run(stack), _config(stack)
    deployment = run.kubernetes_object("Deployment")
    (scaled,) = _objects(run, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    spec = scaled["spec"]
    assert set(spec) <= SCALED_OBJECT_SPEC, set(spec) - SCALED_OBJECT_SPEC
    assert set(spec["scaleTargetRef"]) <= SCALE_TARGET_REF
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    scaling = config.autoscaling
    assert spec["minReplicaCount"] == scaling.min_replicas >= 1
    assert spec["maxReplicaCount"] == scaling.max_replicas >= scaling.min_replicas
    assert spec["pollingInterval"] == scaling.polling_interval_seconds
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior == {"scaleDown": {"stabilizationWindowSeconds": scaling.cooldown_seconds}}
    # KEDA owns the count: the Deployment sets none (pulumi up would reset it).
    assert "replicas" not in deployment["spec"]


@pytest.mark.parametrize("stack", STACKS)
def test_the_trigger_counts_ready_and_unacked_messages_of_the_work_queue(stack: str) -> None:
    run, config = _run(stack), _config(stack)
    (scaled,) = _objects(run, "ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    assert set(trigger) <= TRIGGER
    assert trigger["type"] == "rabbitmq"
    meta = trigger["metadata"]
    assert set(meta) <= RABBITMQ_TRIGGER_METADATA, set(meta) - RABBITMQ_TRIGGER_METADATA
    # KEDA's metadata is a map of strings.
    assert all(isinstance(v, str) for v in meta.values()), meta
    assert meta["protocol"] == "http"  # only the management API counts unacked messages
    assert meta["mode"] == "QueueLength"
    assert meta["excludeUnacknowledged"] == "false"
    assert meta["value"] == str(config.workers.concurrency)  # messagesPerReplica null
    # The queue the workers consume and the vhost their broker URLs name.
    worker = WorkerSettings.from_env(
        {"CELERY_BROKER_URLS": "amqp://u:p@h:5672/celery", "HOSTNAME": "w"}
    )
    assert meta["queueName"] == worker.queue
    assert meta["vhostName"] == rabbitmq.VHOST
    assert "host" not in meta  # credentials only through the TriggerAuthentication


@pytest.mark.parametrize("stack", STACKS)
def test_the_scaler_authenticates_as_the_management_only_user(stack: str) -> None:
    run = _run(stack)
    (scaled,) = _objects(run, "ScaledObject")
    (auth,) = _objects(run, "TriggerAuthentication")
    namespace = scaled["metadata"]["namespace"]
    assert auth["metadata"]["namespace"] == namespace
    assert scaled["spec"]["triggers"][0]["authenticationRef"] == {"name": auth["metadata"]["name"]}
    refs = auth["spec"]["secretTargetRef"]
    assert all(set(ref) == SECRET_TARGET_REF for ref in refs)
    assert {ref["parameter"] for ref in refs} == {"host", "username", "password"}
    assert {ref["parameter"] for ref in refs} <= RABBITMQ_AUTH_PARAMETERS
    (secret_name,) = {ref["name"] for ref in refs}
    secret = run.kubernetes_object("Secret", secret_name)
    assert secret["metadata"]["namespace"] == namespace
    data = {k: base64.b64decode(v).decode() for k, v in reveal(secret)["data"].items()}
    assert {ref["key"] for ref in refs} == set(data)
    assert data["host"] == (
        f"http://rabbitmq.rabbitmq.svc.cluster.local:{rabbitmq.MANAGEMENT_PORT}/celery"
    )
    assert data["username"] == rabbitmq.MONITOR_USERNAME
    # The same user, with that password, is in the definitions RabbitMQ imports: the
    # management tag, and on the vhost permissions that match no resource.
    credentials = reveal(run.kubernetes_object("Secret", rabbitmq.SECRET))["data"]
    definitions = json.loads(base64.b64decode(credentials[rabbitmq.DEFINITIONS_KEY]).decode())
    (user,) = [u for u in definitions["users"] if u["name"] == rabbitmq.MONITOR_USERNAME]
    assert user["tags"] == ["management"]
    assert user["password_hash"] == rabbitmq_password_hash(data["password"])
    (rights,) = [p for p in definitions["permissions"] if p["user"] == rabbitmq.MONITOR_USERNAME]
    assert rights == {
        "user": rabbitmq.MONITOR_USERNAME,
        "vhost": rabbitmq.VHOST,
        "configure": "",
        "write": "",
        "read": "",
    }
    assert data["password"] != reveal(run.kubernetes_object("Secret", rabbitmq.SECRET))["data"].get(
        rabbitmq.PASSWORD_KEY
    )


def test_the_url_is_the_one_kedas_scaler_requests() -> None:
    url = autoscaling.queue_depth_url
    assert (
        url("http://h:15672/celery", "celery", "celery")
        == "http://h:15672/api/queues/celery/celery"
    )
    # No vhostName: the host's last segment; a prefix before it stays; "/" is %2F.
    assert url("http://h:15672/mgmt/vh", "", "q") == "http://h:15672/mgmt/api/queues/vh/q"
    assert url("http://h:15672/", "", "a b/c") == "http://h:15672/api/queues/%2F/a+b%2Fc"


@pytest.mark.parametrize("stack", STACKS)
def test_keda_is_installed_from_its_pinned_chart(stack: str) -> None:
    run, config = _run(stack), _config(stack)
    (release,) = run.helm_releases()
    inputs = reveal(release.inputs)
    assert inputs["chart"] == "keda"
    assert inputs["version"] == KEDA_CHART_VERSION == config.autoscaling.keda_chart_version
    assert inputs["repositoryOpts"] == {"repo": "https://kedacore.github.io/charts"}
    assert inputs["namespace"] == config.autoscaling.keda_namespace
    assert inputs["createNamespace"] is True
    assert inputs["values"] == {"watchNamespace": config.workers.namespace}
    (scaled,) = [r for r, m in run.kubernetes_objects() if m["kind"] == "ScaledObject"]
    assert release.urn in scaled.dependencies  # its CRDs first
    # KEDA's namespace may read the management port, nothing else of RabbitMQ.
    policy = run.kubernetes_object("NetworkPolicy", rabbitmq.NETWORK_POLICY)
    keda = [
        rule
        for rule in policy["spec"]["ingress"]
        if rule["from"][0].get("namespaceSelector", {}).get("matchLabels")
        == {"kubernetes.io/metadata.name": config.autoscaling.keda_namespace}
    ]
    assert keda == [
        {
            "from": [
                {
                    "namespaceSelector": {
                        "matchLabels": {
                            "kubernetes.io/metadata.name": config.autoscaling.keda_namespace
                        }
                    }
                }
            ],
            "ports": [{"protocol": "TCP", "port": rabbitmq.MANAGEMENT_PORT}],
        }
    ]


def test_an_existing_keda_gets_the_scaled_object_but_no_chart() -> None:
    run = _run_with("prod", autoscaling={"keda": "existing"})
    assert run.helm_releases() == []
    assert len(_objects(run, "ScaledObject")) == 1


def test_without_keda_the_workers_keep_a_fixed_count_and_no_monitor_user() -> None:
    run = _run_with("prod", autoscaling={"keda": "none"})
    assert run.helm_releases() == []
    kinds = {m["kind"] for _, m in run.kubernetes_objects()}
    assert not kinds & {"ScaledObject", "TriggerAuthentication"}
    deployment = run.kubernetes_object("Deployment")
    assert deployment["spec"]["replicas"] == _config("prod").workers.replicas
    credentials = reveal(run.kubernetes_object("Secret", rabbitmq.SECRET))["data"]
    definitions = base64.b64decode(credentials[rabbitmq.DEFINITIONS_KEY]).decode()
    assert rabbitmq.MONITOR_USERNAME not in definitions
    assert (
        len(run.kubernetes_object("NetworkPolicy", rabbitmq.NETWORK_POLICY)["spec"]["ingress"]) == 3
    )


@pytest.mark.parametrize("stack", STACKS)
def test_scale_in_lets_the_longest_task_finish(stack: str) -> None:
    """A worker the HPA removes gets SIGTERM: warm shutdown within the grace period
    (longer than the longest task), late acks for what it had not started."""
    config = _config(stack)
    pod = _run(stack).kubernetes_object("Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > config.workers.longest_task_seconds
    settings = WorkerSettings.from_env(
        {"CELERY_BROKER_URLS": "amqp://u:p@h:5672/celery", "HOSTNAME": "w"}
    )
    conf = celery_config(settings)
    assert conf["task_acks_late"] is True
    assert conf["worker_prefetch_multiplier"] == 1


@pytest.mark.parametrize(
    ("changes", "key", "allowed"),
    [
        ({"minReplicas": 5, "maxReplicas": 2}, "autoscaling.maxReplicas", "minReplicas (5)"),
        ({"minReplicas": 0}, "autoscaling.minReplicas", "an integer from 1 to 1000"),
        ({"messagesPerReplica": 0}, "autoscaling.messagesPerReplica", "an integer >= 1"),
        ({"pollingIntervalSeconds": 1}, "autoscaling.pollingIntervalSeconds", "from 5 to 3600"),
        ({"cooldownSeconds": -1}, "autoscaling.cooldownSeconds", "from 0 to 86400"),
        ({"keda": "helm"}, "autoscaling.keda", "'install', 'existing', 'none'"),
        ({"kedaNamespace": "workers"}, "autoscaling.kedaNamespace", "a namespace of its own"),
        ({"kedaChartVersion": "latest"}, "autoscaling.kedaChartVersion", "a pinned chart version"),
        ({"maxReplicas": "12"}, "autoscaling.maxReplicas", "an integer"),
    ],
)  # fmt: skip
def test_bad_autoscaling_config_is_refused_by_key(
    changes: dict[str, Any], key: str, allowed: str
) -> None:
    raw = stack_config("prod")
    raw["celery-cluster:autoscaling"] = {**raw["celery-cluster:autoscaling"], **changes}
    with pytest.raises(ConfigError) as raised:
        load_stack_config(raw, "prod")
    message = str(raised.value)
    assert f"celery-cluster:{key}" in message and allowed in message, message


def test_keda_is_not_installed_on_a_kubernetes_it_does_not_support() -> None:
    raw = stack_config("prod")
    raw["celery-cluster:kubernetes"] = {"version": "1.32"}
    with pytest.raises(ConfigError, match=r"kubernetes.version = '1.32': one of 1.33, 1.34"):
        load_stack_config(raw, "prod")
    raw["celery-cluster:autoscaling"] = {"keda": "existing"}
    assert load_stack_config(raw, "prod").kubernetes.version == "1.32"


# --- node pools and placement -----------------------------------------------------------


def test_prod_runs_rabbitmq_on_its_own_tainted_pool_and_workers_on_an_autoscaled_one() -> None:
    run, config = _run("prod"), _config("prod")
    pools = {r.name: reveal(r.inputs) for r in run.of_type(NODE_POOL)}
    assert set(pools) == {"celery-pool", "celery-worker-pool"}
    main, workers = pools["celery-pool"], pools["celery-worker-pool"]
    assert main["nodeCount"] == config.gke.nodes_per_zone
    assert "autoscaling" not in main  # RabbitMQ wants exactly its nodes
    assert main["nodeConfig"]["labels"][POOL_LABEL] == "rabbitmq"
    assert main["nodeConfig"]["taints"] == [
        {"key": POOL_LABEL, "value": "rabbitmq", "effect": "NO_SCHEDULE"}
    ]
    pool = config.gke.worker_pool
    assert workers["autoscaling"] == {
        "minNodeCount": pool.min_nodes_per_zone,
        "maxNodeCount": pool.max_nodes_per_zone,
        "locationPolicy": "BALANCED",
    }
    assert workers["initialNodeCount"] == pool.min_nodes_per_zone
    assert "nodeCount" not in workers  # the autoscaler owns it
    assert workers["nodeConfig"]["machineType"] == pool.machine_type
    assert workers["nodeConfig"]["spot"] is False
    assert workers["nodeConfig"]["labels"][POOL_LABEL] == "workers"
    assert "taints" not in workers["nodeConfig"]
    # Workloads wait for both pools.
    provider = run.one("pulumi:providers:kubernetes", "celery-k8s")
    assert {r.urn for r in run.of_type(NODE_POOL)} <= set(provider.dependencies)
    # RabbitMQ tolerates its pool's taint and asks for it; workers and the scheduler
    # ask for theirs.
    broker = run.kubernetes_object("StatefulSet")["spec"]["template"]["spec"]
    assert broker["nodeSelector"] == {POOL_LABEL: "rabbitmq"}
    assert broker["tolerations"] == [
        {"key": POOL_LABEL, "operator": "Equal", "value": "rabbitmq", "effect": "NoSchedule"}
    ]
    worker = run.kubernetes_object("Deployment")["spec"]["template"]["spec"]
    assert worker["nodeSelector"] == {POOL_LABEL: "workers"}
    assert "tolerations" not in worker


def test_dev_keeps_one_pool_for_everything() -> None:
    run = _run("dev")
    (pool,) = [reveal(r.inputs) for r in run.of_type(NODE_POOL)]
    assert "taints" not in pool["nodeConfig"] and POOL_LABEL not in pool["nodeConfig"]["labels"]
    for kind in ("StatefulSet", "Deployment", "Job"):
        spec = run.kubernetes_object(kind)["spec"]["template"]["spec"]
        assert "nodeSelector" not in spec and "tolerations" not in spec, kind


def test_a_spot_worker_pool_in_dev_takes_capacity_from_any_zone() -> None:
    run = _run_with(
        "dev", gke={"workerPool": {"enabled": True, "spot": True, "maxNodesPerZone": 5}}
    )
    workers = reveal(run.one(NODE_POOL, "celery-worker-pool").inputs)
    assert workers["nodeConfig"]["spot"] is True
    assert workers["autoscaling"]["locationPolicy"] == "ANY"
    assert workers["autoscaling"]["maxNodeCount"] == 5
    job = run.kubernetes_object("Job")["spec"]["template"]["spec"]
    assert job["nodeSelector"] == {POOL_LABEL: "workers"}


def test_an_existing_cluster_gets_no_pool_placement() -> None:
    raw = stack_config("dev")
    raw["celery-cluster:target"] = "existing"
    raw["celery-cluster:workers"] = {**raw["celery-cluster:workers"], "image": "example/celery:1"}
    raw["celery-cluster:rabbitmq"] = {**raw["celery-cluster:rabbitmq"], "storageClass": "standard"}
    raw["celery-cluster:gke"] = {**raw["celery-cluster:gke"], "workerPool": {"enabled": True}}
    run = run_program(raw, "dev")
    assert run.error is None, run.error
    for kind in ("StatefulSet", "Deployment"):
        assert "nodeSelector" not in run.kubernetes_object(kind)["spec"]["template"]["spec"]


@pytest.mark.parametrize(
    ("changes", "key", "allowed"),
    [
        ({"minNodesPerZone": 0}, "gke.workerPool.minNodesPerZone", "cluster services"),
        ({"minNodesPerZone": 3, "maxNodesPerZone": 2}, "gke.workerPool.maxNodesPerZone", "(3)"),
        ({"spot": True}, "gke.workerPool.spot", "30 s notice"),
        ({"machineType": "big"}, "gke.workerPool.machineType", "a Compute Engine machine type"),
    ],
)
def test_bad_worker_pool_config_is_refused_by_key(
    changes: dict[str, Any], key: str, allowed: str
) -> None:
    raw = stack_config("prod")
    gke = raw["celery-cluster:gke"]
    raw["celery-cluster:gke"] = {**gke, "workerPool": {**gke["workerPool"], **changes}}
    with pytest.raises(ConfigError) as raised:
        load_stack_config(raw, "prod")
    message = str(raised.value)
    assert f"celery-cluster:{key}" in message and allowed in message, message
