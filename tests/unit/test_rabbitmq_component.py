"""The RabbitMQ component: each builder on its own, then as every stack registers it."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import re
from collections.abc import Iterator
from functools import cache
from typing import Any

import pytest

from components import kube, rabbitmq
from components.config import load_stack_config, quantity_bytes
from components.names import AMQP_CLIENT_LABEL, BROKER_URLS_KEY, STACK_LABEL
from components.rabbitmq import RabbitmqClusterArgs
from components.rabbitmq_conf import supports_partition_handling
from tests.unit.test_rabbitmq_conf import settings as _settings
from tools.mockrun import (
    ProgramRun,
    is_secret,
    reveal,
    run_program,
    stack_config,
    stack_names,
)

STACKS = stack_names()
STATEFULSET_TYPE = "kubernetes:apps/v1:StatefulSet"
STORAGE_CLASS_TYPE = "kubernetes:storage.k8s.io/v1:StorageClass"
SECRET_TYPE = "kubernetes:core/v1:Secret"
COMPONENT_TYPE = "celerycluster:rabbitmq:RabbitmqCluster"
# What the mocks return for a RandomPassword of the component's lengths.
MOCK_PASSWORD = "x" * 32
MOCK_COOKIE = "x" * 48


def _config(stack: str) -> RabbitmqClusterArgs:
    return RabbitmqClusterArgs.from_stack(load_stack_config(stack_config(stack), stack))


def _with_rabbitmq(config: RabbitmqClusterArgs, **changes: Any) -> RabbitmqClusterArgs:
    return dataclasses.replace(config, rabbitmq=dataclasses.replace(config.rabbitmq, **changes))


@cache
def _run(stack: str) -> ProgramRun:
    run = run_program(stack_config(stack), stack)
    assert run.error is None, run.error
    return run


def _run_with_image(stack: str, image: str) -> ProgramRun:
    raw = copy.deepcopy(stack_config(stack))
    raw["celery-cluster:rabbitmq"] = {**raw["celery-cluster:rabbitmq"], "image": image}
    run = run_program(raw, stack)
    assert run.error is None, run.error
    return run


def _pod(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["template"]["spec"]


def _container(manifest: dict[str, Any]) -> dict[str, Any]:
    (container,) = _pod(manifest)["containers"]
    return container


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _outside_secrets(value: Any) -> Any:
    """The value with every secret-marked part dropped."""
    if is_secret(value):
        return None
    if isinstance(value, dict):
        return {k: _outside_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_outside_secrets(v) for v in value]
    return value


# --- builders, on their own ---------------------------------------------------------


def test_namespace_enforces_the_restricted_pod_security_standard() -> None:
    manifest = rabbitmq.namespace(_config("prod"))
    assert manifest["metadata"]["name"] == "rabbitmq"
    assert manifest["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_storage_class_uses_the_pd_csi_driver_and_keeps_production_disks() -> None:
    prod = rabbitmq.storage_class(_config("prod"))
    assert prod["metadata"]["name"] == "rabbitmq-pd-ssd-prod"
    assert prod["provisioner"] == "pd.csi.storage.gke.io"
    assert prod["parameters"] == {"type": "pd-ssd", "labels": f"{STACK_LABEL}=prod"}
    assert prod["volumeBindingMode"] == "WaitForFirstConsumer"
    assert prod["allowVolumeExpansion"] is True
    assert prod["reclaimPolicy"] == "Retain"

    dev = rabbitmq.storage_class(_config("dev"))
    assert dev["metadata"]["name"] == "rabbitmq-pd-balanced-dev"
    assert dev["parameters"] == {"type": "pd-balanced", "labels": f"{STACK_LABEL}=dev"}
    assert dev["reclaimPolicy"] == "Delete"


def test_storage_classes_and_disk_labels_of_two_stacks_never_collide() -> None:
    """Cluster-scoped: two stacks on one cluster must not share a StorageClass, and a
    stack name Kubernetes or GCP would refuse is made valid, never shared."""
    names = set()
    for stack in ("dev", "prod", "Dev", "team_a.staging", "x" * 80, "x" * 81):
        args = dataclasses.replace(_config("prod"), stack=stack)
        manifest = rabbitmq.storage_class(args)
        name = manifest["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name
        key, value = manifest["parameters"]["labels"].split("=")
        assert key == STACK_LABEL
        assert re.fullmatch(r"[a-z0-9][-a-z0-9]{0,62}", value), value
        names.add(name)
    assert len(names) == 6


def test_an_unmanaged_storage_class_is_used_as_is() -> None:
    config = _with_rabbitmq(_config("dev"), storage_class="standard")
    assert not rabbitmq.manages_storage_class(config)
    assert rabbitmq.storage_class_name(config) == "standard"
    claim = rabbitmq.stateful_set(config)["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["storageClassName"] == "standard"


def test_secret_holds_cookie_and_app_credentials_and_no_guest() -> None:
    config = _config("prod")
    data = rabbitmq.secret_string_data(config, erlang_cookie="C" * 48, password="p4ss")
    assert data[rabbitmq.COOKIE_KEY] == "C" * 48
    assert data[rabbitmq.USERNAME_KEY] == rabbitmq.APP_USERNAME != "guest"
    assert data[rabbitmq.PASSWORD_KEY] == "p4ss"
    assert "default_user = celery" in data[rabbitmq.DEFAULT_USER_CONF_KEY]
    assert "default_pass = p4ss" in data[rabbitmq.DEFAULT_USER_CONF_KEY]
    # The user really exists: boot-time definitions import skips default_user seeding.
    definitions = json.loads(data[rabbitmq.DEFINITIONS_KEY])
    (user,) = definitions["users"]
    assert user["name"] == "celery" and user["password_hash"]
    assert "p4ss" not in data[rabbitmq.DEFINITIONS_KEY]
    # Quorum queues and a delivery limit replace the article's ha-all mirroring.
    assert "ha-mode" not in data[rabbitmq.DEFINITIONS_KEY]
    assert definitions["permissions"][0]["vhost"] == rabbitmq.VHOST
    (policy,) = definitions["policies"]
    assert policy["definition"]["delivery-limit"] == config.rabbitmq.delivery_limit
    urls = data[BROKER_URLS_KEY].split(",")
    assert urls == rabbitmq.broker_urls(config, "celery", "p4ss")

    encoded = rabbitmq.secret_data(data)
    assert set(encoded) == set(data)
    assert base64.b64decode(encoded[rabbitmq.PASSWORD_KEY]) == b"p4ss"
    manifest = rabbitmq.secret(config, encoded)
    assert manifest["type"] == "Opaque"
    assert manifest["data"] is encoded
    assert "stringData" not in manifest


def test_broker_urls_name_every_pod_of_the_headless_service() -> None:
    config = _config("prod")
    urls = rabbitmq.broker_urls(config, "celery", "s3cr3t/+")
    assert urls == [
        f"amqp://celery:s3cr3t%2F%2B@rabbitmq-server-{i}.rabbitmq-nodes.rabbitmq"
        f".svc.cluster.local:5672/celery"
        for i in range(3)
    ]


def test_config_map_is_rendered_by_the_renderer_for_kubernetes() -> None:
    config = _config("prod")
    data = rabbitmq.config_map(config)["data"]
    assert set(data) == {"rabbitmq.conf", "enabled_plugins"}
    conf = data["rabbitmq.conf"]
    assert "cluster_formation.peer_discovery_backend = rabbit_peer_discovery_k8s" in conf
    assert f"definitions.local.path = {rabbitmq.DEFINITIONS_FILE}" in conf
    assert "rabbitmq_peer_discovery_k8s" in data["enabled_plugins"]
    assert "password" not in json.dumps(data)


@pytest.mark.parametrize(
    ("image", "paused"),
    [
        ("rabbitmq:3.13.7-management", True),
        ("rabbitmq:4.1.4-management", True),
        ("rabbitmq:4.2.1-management", True),
        ("rabbitmq:4.3.0-management", False),
    ],
)
def test_pause_minority_only_where_the_version_knows_it(image: str, paused: bool) -> None:
    config = _with_rabbitmq(_config("prod"), image=image)
    conf = rabbitmq.config_map(config)["data"]["rabbitmq.conf"]
    assert ("cluster_partition_handling = pause_minority" in conf) is paused
    assert supports_partition_handling(config.rabbitmq.version) is paused


def test_rbac_allows_what_peer_discovery_needs_and_nothing_more() -> None:
    config = _with_rabbitmq(_config("prod"), image="rabbitmq:4.0.9-management")
    rules = rabbitmq.role(config)["rules"]
    assert {(r["resources"][0], v) for r in rules for v in r["verbs"]} == {
        ("endpoints", "get"),
        ("events", "create"),
    }
    binding = rabbitmq.role_binding(config)
    assert binding["roleRef"]["name"] == rabbitmq.role(config)["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": rabbitmq.SERVICE_ACCOUNT, "namespace": "rabbitmq"}
    ]
    assert rabbitmq.service_account(config)["metadata"]["name"] == rabbitmq.SERVICE_ACCOUNT
    assert rabbitmq.service_account(config)["automountServiceAccountToken"] is True
    assert _pod(rabbitmq.stateful_set(config))["automountServiceAccountToken"] is True


@pytest.mark.parametrize(
    ("image", "api"),
    [
        ("rabbitmq:3.13.7-management", True),
        ("rabbitmq:4.0.9-management", True),
        ("rabbitmq:4.1.4-management", False),
        ("rabbitmq:4.3.6-management", False),
    ],
)
def test_a_token_and_rbac_only_where_peer_discovery_calls_the_api(image: str, api: bool) -> None:
    """From 4.1 the k8s plugin derives pod -0 from its own name: no token, no Role."""
    args = _with_rabbitmq(_config("prod"), image=image)
    assert _pod(rabbitmq.stateful_set(args))["automountServiceAccountToken"] is api
    assert rabbitmq.service_account(args)["automountServiceAccountToken"] is api
    env = {e["name"] for e in _container(rabbitmq.stateful_set(args))["env"]}
    assert ("K8S_HOSTNAME_SUFFIX" in env) is api
    run = _run_with_image("prod", image)
    kinds = {m["kind"] for _, m in run.kubernetes_objects()}
    assert ("Role" in kinds) is api
    assert ("RoleBinding" in kinds) is api


def test_headless_service_publishes_not_ready_pods_with_named_cluster_ports() -> None:
    spec = rabbitmq.headless_service(_config("prod"))["spec"]
    assert spec["clusterIP"] == "None"
    assert spec["publishNotReadyAddresses"] is True
    assert {p["name"]: p["port"] for p in spec["ports"]} == {"epmd": 4369, "cluster-links": 25672}
    assert spec["selector"] == rabbitmq.selector()


def test_client_service_is_internal_only() -> None:
    manifest = rabbitmq.client_service(_config("prod"))
    assert manifest["metadata"]["name"] == "rabbitmq"
    assert manifest["spec"]["type"] == "ClusterIP"
    assert {p["name"]: p["port"] for p in manifest["spec"]["ports"]} == {
        "amqp": 5672,
        "management": 15672,
        "prometheus": 15692,
    }


def test_production_statefulset_shape() -> None:
    config = _config("prod")
    manifest = rabbitmq.stateful_set(config)
    spec = manifest["spec"]
    pod = _pod(manifest)
    assert manifest["metadata"]["name"] == "rabbitmq-server"
    assert spec["replicas"] == 3
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["serviceName"] == rabbitmq.HEADLESS_SERVICE
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert spec["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["spec"]["storageClassName"] == "rabbitmq-pd-ssd-prod"
    assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    (term,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "topology.kubernetes.io/zone"
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"
    assert pod["terminationGracePeriodSeconds"] == config.rabbitmq.termination_grace_seconds >= 60
    assert pod["serviceAccountName"] == rabbitmq.SERVICE_ACCOUNT
    container = _container(manifest)
    assert container["image"] == "rabbitmq:4.3.6-management"
    assert container["resources"] == config.rabbitmq.resources.to_kubernetes()
    assert container["resources"]["limits"] == {"cpu": "2", "memory": "4Gi"}


def test_development_statefulset_is_disposable_and_prefers_spreading() -> None:
    manifest = rabbitmq.stateful_set(_config("dev"))
    assert manifest["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Delete"
    anti = _pod(manifest)["affinity"]["podAntiAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in anti
    (preferred,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred["weight"] == 100
    assert preferred["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"


def test_node_names_are_long_and_stable() -> None:
    env = {e["name"]: e for e in _container(rabbitmq.stateful_set(_config("prod")))["env"]}
    assert env["MY_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["MY_POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["RABBITMQ_USE_LONGNAME"]["value"] == "true"
    assert env["K8S_SERVICE_NAME"]["value"] == rabbitmq.HEADLESS_SERVICE
    assert (
        env["RABBITMQ_NODENAME"]["value"]
        == "rabbit@$(MY_POD_NAME).$(K8S_SERVICE_NAME).$(MY_POD_NAMESPACE)"
    )
    # The deprecated variable is not used: the cookie is a file.
    assert "RABBITMQ_ERLANG_COOKIE" not in env


def test_probes_cannot_deadlock_a_full_restart() -> None:
    container = _container(rabbitmq.stateful_set(_config("prod")))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["amqp"] == 5672
    assert ports["cluster-links"] == 25672
    assert ports[container["readinessProbe"]["tcpSocket"]["port"]] == 5672
    startup = container["startupProbe"]
    command = " ".join(startup["exec"]["command"])
    assert "node_health_check" not in command
    assert "check_port_connectivity" in command
    # Longer than Mnesia's default wait for peers (10 x 30 s) after a full stop.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 10 * 60
    assert "livenessProbe" not in container


def test_prestop_keeps_quorum_then_drains_within_the_grace_period() -> None:
    config = _config("prod")
    container = _container(rabbitmq.stateful_set(config))
    script = container["lifecycle"]["preStop"]["exec"]["command"][-1]
    await_at = script.index("rabbitmq-upgrade await_online_quorum_plus_one -t ")
    drain_at = script.index("rabbitmq-upgrade drain -t ")
    assert await_at < drain_at
    timeouts = [int(t) for t in re.findall(r" -t (\d+)", script)]
    assert timeouts == list(rabbitmq.prestop_timeouts(config.rabbitmq.termination_grace_seconds))
    assert rabbitmq.SKIP_PRESTOP_LABEL in script


@pytest.mark.parametrize("grace", [60, 61, 300, 600, 3600, 86400])
def test_prestop_timeouts_leave_time_for_a_clean_stop(grace: int) -> None:
    await_seconds, drain_seconds = rabbitmq.prestop_timeouts(grace)
    assert await_seconds > 0
    assert drain_seconds > 0
    assert await_seconds + drain_seconds < grace


def test_no_prestop_wait_on_a_cluster_without_a_quorum_to_keep() -> None:
    container = _container(rabbitmq.stateful_set(_with_rabbitmq(_config("dev"), replicas=1)))
    assert "lifecycle" not in container


def test_pod_runs_as_rabbitmq_with_a_read_only_root_filesystem() -> None:
    manifest = rabbitmq.stateful_set(_config("prod"))
    pod = _pod(manifest)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 999
    assert pod["securityContext"]["fsGroup"] == 999
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["initContainers"] + pod["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["readOnlyRootFilesystem"] is True
        assert "runAsUser" not in context  # never root, not even the init container


def test_cookie_is_copied_owner_only_into_home() -> None:
    pod = _pod(rabbitmq.stateful_set(_config("prod")))
    (setup,) = pod["initContainers"]
    script = setup["command"][-1]
    assert f"cp {rabbitmq.COOKIE_SECRET_DIR}/.erlang.cookie /var/lib/rabbitmq/.erlang.cookie" in (
        script
    )
    assert "chmod 600 /var/lib/rabbitmq/.erlang.cookie" in script
    volumes = {v["name"]: v for v in pod["volumes"]}
    cookie_volume = volumes["erlang-cookie-secret"]["secret"]
    assert cookie_volume["secretName"] == rabbitmq.SECRET
    assert cookie_volume["items"] == [{"key": ".erlang.cookie", "path": ".erlang.cookie"}]
    # Only the init container sees the Secret's copy of the cookie.
    (main,) = pod["containers"]
    assert "erlang-cookie-secret" not in {m["name"] for m in main["volumeMounts"]}


def test_every_mount_has_a_volume_and_every_sub_path_a_key() -> None:
    config = _config("prod")
    manifest = rabbitmq.stateful_set(config)
    pod = _pod(manifest)
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {c["metadata"]["name"] for c in manifest["spec"]["volumeClaimTemplates"]}
    config_keys = set(rabbitmq.config_map(config)["data"])
    secret_keys = set(rabbitmq.secret_string_data(config, erlang_cookie="c", password="p"))
    for container in pod["initContainers"] + pod["containers"]:
        for mount in container["volumeMounts"]:
            assert mount["name"] in volumes or mount["name"] in claims, mount
            if "subPath" not in mount:
                continue
            source = volumes[mount["name"]]
            if "configMap" in source:
                assert source["configMap"]["name"] == rabbitmq.CONFIG_MAP
                assert mount["subPath"] in config_keys
            else:
                items = {i["path"]: i["key"] for i in source["secret"]["items"]}
                assert items[mount["subPath"]] in secret_keys
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/var/lib/rabbitmq/mnesia"]["name"] == "persistence"
    assert mounts["/etc/rabbitmq/conf.d/default_user.conf"]["name"] == "credentials"
    assert mounts["/etc/rabbitmq/rabbitmq.conf"]["subPath"] == "rabbitmq.conf"
    # One definitions document (topology and user), from the Secret.
    assert mounts[rabbitmq.DEFINITIONS_FILE]["name"] == "credentials"
    assert mounts[rabbitmq.DEFINITIONS_FILE]["subPath"] == rabbitmq.DEFINITIONS_KEY


def test_a_configuration_change_rolls_the_pods() -> None:
    config = _config("prod")
    changed = _with_rabbitmq(config, delivery_limit=config.rabbitmq.delivery_limit + 1)
    annotations = rabbitmq.stateful_set(config)["spec"]["template"]["metadata"]["annotations"]
    assert annotations[rabbitmq.CONFIG_HASH_ANNOTATION] == rabbitmq.config_hash(config)
    assert rabbitmq.config_hash(config) != rabbitmq.config_hash(changed)


def test_pod_disruption_budget_allows_one_node_down() -> None:
    spec = rabbitmq.pod_disruption_budget(_config("prod"))["spec"]
    assert spec == {"maxUnavailable": 1, "selector": {"matchLabels": rabbitmq.selector()}}


def test_network_policy_admits_clients_peers_scrapers_and_keda_only() -> None:
    config = _config("prod")
    spec = rabbitmq.network_policy(config)["spec"]
    assert spec["podSelector"] == {"matchLabels": rabbitmq.selector()}
    assert spec["policyTypes"] == ["Ingress"]
    clients, peers, scrapers, keda = spec["ingress"]
    # KEDA's namespace reads the management API (queue depth), nothing else.
    assert keda == {
        "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}}],
        "ports": [{"protocol": "TCP", "port": 15672}],
    }
    without = dataclasses.replace(config, monitor_namespace=None)
    assert len(rabbitmq.network_policy(without)["spec"]["ingress"]) == 3
    assert clients["from"] == [
        {
            "namespaceSelector": {
                "matchLabels": {"kubernetes.io/metadata.name": config.client_namespace}
            },
            "podSelector": {"matchLabels": {AMQP_CLIENT_LABEL: "true"}},
        }
    ]
    assert clients["ports"] == [{"protocol": "TCP", "port": 5672}]
    assert peers["from"] == [{"podSelector": {"matchLabels": rabbitmq.selector()}}]
    peer_ports = {p["port"] for p in peers["ports"]}
    # The CLI tools' ports one by one: Cilium before 1.16 (Dataplane V2) ignored endPort.
    assert {4369, 25672, 15672, *range(35672, 35683)} <= peer_ports
    assert not [p for p in peers["ports"] if "endPort" in p]
    assert scrapers == {
        "from": [{"namespaceSelector": {}}],
        "ports": [{"protocol": "TCP", "port": 15692}],
    }
    # Nobody outside the cluster's own pods reaches AMQP or the management UI.
    for rule in (clients, scrapers):
        assert all("ipBlock" not in source for source in rule["from"])
    assert {p["port"] for p in scrapers["ports"]} == {15692}


def test_register_passes_camel_case_parts_as_snake_case_arguments() -> None:
    assert kube.snake("stringData") == "string_data"
    assert kube.snake("volumeBindingMode") == "volume_binding_mode"
    assert kube.snake("roleRef") == "role_ref"
    assert kube.snake("spec") == "spec"


# --- the real program, every stack --------------------------------------------------


@pytest.mark.parametrize("stack", STACKS)
def test_one_statefulset_per_stack_shaped_by_its_config(stack: str) -> None:
    config = _config(stack)
    run = _run(stack)
    registered = run.one(STATEFULSET_TYPE, "rabbitmq-server")
    manifest = reveal(run.kubernetes_object("StatefulSet", "rabbitmq-server"))
    assert manifest == rabbitmq.stateful_set(config)
    assert registered.protect is config.protect
    spec = manifest["spec"]
    assert spec["replicas"] == config.rabbitmq.replicas
    assert spec["podManagementPolicy"] == "Parallel"
    assert (
        spec["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == config.rabbitmq.pvc_retention
    )
    assert spec["volumeClaimTemplates"][0]["spec"]["storageClassName"]
    assert re.fullmatch(r"rabbitmq:\d+\.\d+\.\d+-management", _container(manifest)["image"])
    assert _container(manifest)["readinessProbe"]["tcpSocket"]["port"] == "amqp"
    assert _pod(manifest)["terminationGracePeriodSeconds"] >= 60


def test_production_registration() -> None:
    run = _run("prod")
    manifest = reveal(run.kubernetes_object("StatefulSet", "rabbitmq-server"))
    pod = _pod(manifest)
    assert manifest["spec"]["replicas"] == 3
    assert "requiredDuringSchedulingIgnoredDuringExecution" in pod["affinity"]["podAntiAffinity"]
    assert manifest["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"
    assert _container(manifest)["resources"]["limits"]
    assert pod["terminationGracePeriodSeconds"] == 3600
    assert run.one(STATEFULSET_TYPE).protect is True
    assert run.one(STORAGE_CLASS_TYPE).protect is True
    assert reveal(run.kubernetes_object("StorageClass"))["reclaimPolicy"] == "Retain"


def test_development_registration() -> None:
    run = _run("dev")
    manifest = reveal(run.kubernetes_object("StatefulSet", "rabbitmq-server"))
    anti = _pod(manifest)["affinity"]["podAntiAffinity"]
    assert anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["weight"] == 100
    assert manifest["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Delete"
    assert run.one(STATEFULSET_TYPE).protect is False
    assert reveal(run.kubernetes_object("StorageClass"))["reclaimPolicy"] == "Delete"


@pytest.mark.parametrize("stack", STACKS)
def test_every_child_has_the_component_parent_and_the_cluster_provider(stack: str) -> None:
    run = _run(stack)
    component = run.one(COMPONENT_TYPE)
    children = [r for r in run.resources if r.parent == component.urn]
    kinds = {r.type for r in children}
    assert {
        "kubernetes:core/v1:Namespace",
        SECRET_TYPE,
        "kubernetes:core/v1:ConfigMap",
        "kubernetes:core/v1:ServiceAccount",
        "kubernetes:core/v1:Service",
        STATEFULSET_TYPE,
        "kubernetes:policy/v1:PodDisruptionBudget",
        "kubernetes:networking.k8s.io/v1:NetworkPolicy",
        "random:index/randomPassword:RandomPassword",
    } <= kinds
    (provider,) = run.of_type("pulumi:providers:kubernetes")
    for child in children:
        if child.type.startswith("kubernetes:"):
            assert child.provider.startswith(provider.urn + "::"), child.name


@pytest.mark.parametrize("stack", STACKS)
def test_services_pdb_and_policy_are_registered(stack: str) -> None:
    run = _run(stack)
    headless = reveal(run.kubernetes_object("Service", rabbitmq.HEADLESS_SERVICE))
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert {p["name"]: p["port"] for p in headless["spec"]["ports"]} == {
        "epmd": 4369,
        "cluster-links": 25672,
    }
    assert "management-ssl" not in json.dumps(headless)
    client = reveal(run.kubernetes_object("Service", rabbitmq.CLIENT_SERVICE))
    assert client["spec"]["type"] == "ClusterIP"
    assert (
        reveal(run.kubernetes_object("PodDisruptionBudget", rabbitmq.PDB))["spec"]["maxUnavailable"]
        == 1
    )
    assert run.kubernetes_object("NetworkPolicy", rabbitmq.NETWORK_POLICY)
    for _, manifest in run.kubernetes_objects():
        assert manifest["kind"] != "Ingress"
        if manifest["kind"] == "Service":
            assert manifest["spec"].get("type", "ClusterIP") == "ClusterIP"


@pytest.mark.parametrize("stack", STACKS)
def test_config_map_uses_k8s_discovery_and_pause_minority_per_version(stack: str) -> None:
    config = _config(stack)
    registered = _run(stack).kubernetes_object("ConfigMap", rabbitmq.CONFIG_MAP)
    assert not is_secret(registered["data"])  # nothing secret in the ConfigMap
    conf = reveal(registered)["data"]["rabbitmq.conf"]
    assert "cluster_formation.peer_discovery_backend = rabbit_peer_discovery_k8s" in conf
    has_pause = "cluster_partition_handling = pause_minority" in conf
    assert has_pause is supports_partition_handling(config.rabbitmq.version)


def test_a_4_3_image_renders_no_partition_handling() -> None:
    run = _run_with_image("prod", "rabbitmq:4.3.0-management")
    conf = reveal(run.kubernetes_object("ConfigMap", rabbitmq.CONFIG_MAP))["data"]["rabbitmq.conf"]
    assert "cluster_partition_handling" not in conf.replace(
        "## is built in and cluster_partition_handling no longer exists.", ""
    )
    assert "pause_minority" not in "\n".join(
        line for line in conf.splitlines() if not line.lstrip().startswith("#")
    )
    container = _container(reveal(run.kubernetes_object("StatefulSet", "rabbitmq-server")))
    assert container["image"] == "rabbitmq:4.3.0-management"


@pytest.mark.parametrize("stack", STACKS)
def test_secret_contents_are_secret_marked(stack: str) -> None:
    run = _run(stack)
    registered = run.one(SECRET_TYPE, "rabbitmq-credentials")
    assert is_secret(registered.inputs["data"])
    assert "stringData" not in registered.inputs
    assert {"data", "stringData"} <= set(registered.additional_secret_outputs)
    data = {
        key: base64.b64decode(value).decode()
        for key, value in reveal(registered.inputs["data"]).items()
    }
    assert data[rabbitmq.COOKIE_KEY] == MOCK_COOKIE
    assert len(data[rabbitmq.COOKIE_KEY]) >= 32
    assert data[rabbitmq.PASSWORD_KEY] == MOCK_PASSWORD
    assert reveal(registered.inputs["type"]) == "Opaque"
    # Both generated from RandomPassword, never literals.
    passwords = {r.name: r for r in run.of_type("random:index/randomPassword:RandomPassword")}
    assert passwords["rabbitmq-erlang-cookie"].inputs["length"] >= 32
    assert passwords["rabbitmq-erlang-cookie"].inputs["special"] is False


@pytest.mark.parametrize("stack", STACKS)
def test_credentials_never_appear_outside_secrets(stack: str) -> None:
    run = _run(stack)
    for registered in run.resources:
        if registered.type.startswith("random:"):
            continue  # the generator itself
        visible = list(_strings(_outside_secrets(registered.inputs)))
        for text in visible:
            for credential in (MOCK_PASSWORD, MOCK_COOKIE):
                assert credential not in text, registered.name
                assert base64.b64encode(credential.encode()).decode()[:40] not in text


@pytest.mark.parametrize("stack", STACKS)
def test_no_guest_user_and_no_article_cookie(stack: str) -> None:
    run = _run(stack)
    for registered in run.resources:
        inputs = reveal(registered.inputs)
        if registered.type == SECRET_TYPE and "data" in inputs:
            inputs["data"] = {k: base64.b64decode(v).decode() for k, v in inputs["data"].items()}
        for text in _strings(inputs):
            for line in text.splitlines():
                if line.lstrip().startswith("#"):
                    continue  # comments may explain why there is no guest
                assert "guest" not in line.lower(), (registered.name, line)
                assert "changethis" not in line.lower(), (registered.name, line)


@pytest.mark.parametrize("stack", STACKS)
def test_broker_urls_output_is_a_secret_with_one_url_per_node(stack: str) -> None:
    config = _config(stack)
    run = _run(stack)
    assert "broker_urls" in run.secret_outputs
    urls = run.outputs["broker_urls"]
    assert urls == rabbitmq.broker_urls(config, rabbitmq.APP_USERNAME, MOCK_PASSWORD)
    assert len(urls) == config.rabbitmq.replicas == 3
    for i, url in enumerate(urls):
        assert f"@rabbitmq-server-{i}.rabbitmq-nodes.rabbitmq.svc.cluster.local:5672/" in url


def test_metrics_are_not_claimed_through_annotations_gke_ignores() -> None:
    """GKE Managed Prometheus scrapes PodMonitoring objects, not prometheus.io/*."""
    for stack in STACKS:
        template = rabbitmq.stateful_set(_config(stack))["spec"]["template"]
        assert not [a for a in template["metadata"]["annotations"] if a.startswith("prometheus.io")]


@pytest.mark.parametrize("stack", STACKS)
def test_rabbitmq_sizes_its_memory_alarm_from_the_container_limit(stack: str) -> None:
    """Without the override RabbitMQ reads the node's /proc/meminfo and is OOM-killed
    before its alarm fires; with it, the alarm fires inside the container's limit."""
    args = _config(stack)
    limit = args.rabbitmq.memory_limit_bytes
    assert limit is not None  # every stack, dev included
    container = _container(rabbitmq.stateful_set(args))
    assert quantity_bytes(container["resources"]["limits"]["memory"]) == limit
    conf = _settings(rabbitmq.config_map(args)["data"]["rabbitmq.conf"])
    available = int(conf["total_memory_available_override_value"])
    # The Operator's headroom: 20 % of the limit, at most 2 GiB.
    assert available == limit - min(limit // 5, 2 * 2**30)
    # RabbitMQ's default watermark (0.6) of that stays far below the limit.
    assert 0.6 * available < 0.5 * limit


def test_production_keeps_free_disk_relative_to_memory_and_the_volume_fits() -> None:
    prod = _config("prod")
    conf = _settings(rabbitmq.config_map(prod)["data"]["rabbitmq.conf"])
    available = int(conf["total_memory_available_override_value"])
    disk_free = int(conf["disk_free_limit.absolute"])
    assert disk_free == int(available * 1.5)
    assert quantity_bytes(prod.rabbitmq.storage_size) >= 2 * disk_free
    dev = _settings(rabbitmq.config_map(_config("dev"))["data"]["rabbitmq.conf"])
    assert dev["disk_free_limit.absolute"] == str(2 * 10**9)


def test_password_login_only() -> None:
    conf = _settings(rabbitmq.config_map(_config("prod"))["data"]["rabbitmq.conf"])
    mechanisms = {v for k, v in conf.items() if k.startswith("auth_mechanisms.")}
    assert mechanisms == {"PLAIN", "AMQPLAIN"}


def test_deletion_outlasts_the_grace_period_and_the_prestop_hook() -> None:
    """pulumi-kubernetes gives up deleting after 10 min by default; the pods may
    take their whole grace period (preStop inside it)."""
    for stack in STACKS:
        args = _config(stack)
        timeouts = rabbitmq.stateful_set_timeouts(args)
        assert timeouts.delete is not None
        assert int(timeouts.delete.rstrip("m")) * 60 > args.rabbitmq.termination_grace_seconds
        await_s, drain_s = rabbitmq.prestop_timeouts(args.rabbitmq.termination_grace_seconds)
        assert int(timeouts.delete.rstrip("m")) * 60 > await_s + drain_s


@pytest.mark.parametrize(
    ("image", "replicas", "wrapped"),
    [
        ("rabbitmq:4.3.6-management", 3, True),
        ("rabbitmq:4.1.4-management", 5, True),
        ("rabbitmq:4.0.9-management", 3, False),  # the API-based plugin: nothing to fix
        ("rabbitmq:4.3.6-management", 1, False),  # no peer to rejoin
    ],
)
def test_pod_0_without_its_volume_rejoins_instead_of_seeding(
    image: str, replicas: int, wrapped: bool
) -> None:
    """From 4.1 ordinal 0 seeds: a pod 0 whose volume was lost would found a second
    cluster (measured on the twin). Its start command joins a running peer instead."""
    args = _with_rabbitmq(_config("prod"), image=image, replicas=replicas)
    container = _container(rabbitmq.stateful_set(args))
    if not wrapped:
        assert "command" not in container  # the image's own rabbitmq-server
        return
    shell, flag, script = container["command"]
    assert (shell, flag) == ("/bin/bash", "-c")
    assert "$(" not in script  # the kubelet would expand $(NAME) itself
    assert script.startswith('if [ "${MY_POD_NAME##*-}" = 0 ]')
    assert '[ ! -d "/var/lib/rabbitmq/mnesia/$RABBITMQ_NODENAME" ]' in script
    peers = [f"rabbitmq-server-{i}.rabbitmq-nodes.rabbitmq" for i in range(1, replicas)]
    assert f"for host in {' '.join(peers)};" in script
    assert "forget_cluster_node" in script and "classic_config" in script
    assert script.endswith("; exec rabbitmq-server")  # PID 1 is RabbitMQ, as before
