"""Each rule on a complying and on a violating resource (run with .venv-policy's python)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from policy import rules

STS = rules.STATEFULSET
DEPLOYMENT = "kubernetes:apps/v1:Deployment"
INGRESS = "kubernetes:networking.k8s.io/v1:Ingress"


def rabbitmq_statefulset(**spec_changes: Any) -> dict[str, Any]:
    """A complying RabbitMQ StatefulSet, trimmed to what the rules read."""
    selector = {"app.kubernetes.io/name": "rabbitmq"}
    manifest: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "rabbitmq-server", "namespace": "rabbitmq"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": selector},
                "spec": {
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 999},
                    "affinity": {
                        "podAntiAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": [
                                {
                                    "labelSelector": {"matchLabels": selector},
                                    "topologyKey": "kubernetes.io/hostname",
                                }
                            ]
                        }
                    },
                    "initContainers": [
                        {
                            "name": "setup",
                            "image": "rabbitmq:4.1.4-management",
                            "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
                        }
                    ],
                    "containers": [
                        {
                            "name": "rabbitmq",
                            "image": "rabbitmq:4.1.4-management",
                            "resources": {"requests": {"cpu": "1", "memory": "2Gi"}},
                        }
                    ],
                    "volumes": [
                        {
                            "name": "erlang-cookie-secret",
                            "secret": {
                                "secretName": "rabbitmq-credentials",
                                "items": [{"key": ".erlang.cookie", "path": ".erlang.cookie"}],
                            },
                        }
                    ],
                },
            },
            "volumeClaimTemplates": [
                {"metadata": {"name": "persistence"}, "spec": {"accessModes": ["ReadWriteOnce"]}}
            ],
        },
    }
    manifest["spec"].update(spec_changes)
    return manifest


def pod(manifest: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = manifest["spec"]["template"]["spec"]
    return spec


def worker_deployment() -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": "celery-worker"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "celery-worker", "namespace": "workers"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": {**labels, "celery-cluster/amqp-client": "true"}},
                "spec": {
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
                    "containers": [
                        {
                            "name": "worker",
                            "image": "example/celery-worker:1",
                            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                        }
                    ],
                },
            },
        },
    }


def pdb(namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"name": "pdb", "namespace": namespace},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}},
    }


def secret(**string_data: str) -> dict[str, Any]:
    return {"metadata": {"name": "s", "namespace": "rabbitmq"}, "stringData": string_data}


def config_map(**data: str) -> dict[str, Any]:
    return {"metadata": {"name": "c", "namespace": "rabbitmq"}, "data": data}


# --- the production decision ------------------------------------------------------


def test_production_comes_from_the_stack_in_the_urn() -> None:
    urn = "urn:pulumi:prod::celery-cluster::kubernetes:apps/v1:StatefulSet::rabbitmq-server"
    assert rules.stack_of(urn) == "prod"
    assert rules.is_production(urn)
    assert not rules.is_production(urn.replace(":prod::", ":dev::"))
    assert rules.is_production(urn.replace(":prod::", ":live::"), ["live"])


# --- RabbitMQ StatefulSet: anti-affinity and volumes ------------------------------------


def test_rabbitmq_statefulset_with_anti_affinity_and_volumes_passes() -> None:
    assert rules.rabbitmq_statefulset_ha(STS, rabbitmq_statefulset(), production=True) == []


def test_rabbitmq_statefulset_without_anti_affinity_fails() -> None:
    sts = rabbitmq_statefulset()
    del pod(sts)["affinity"]
    [message] = rules.rabbitmq_statefulset_ha(STS, sts, production=False)
    assert "anti-affinity" in message


def test_preferred_anti_affinity_passes_in_dev_fails_in_production() -> None:
    sts = rabbitmq_statefulset()
    term = pod(sts)["affinity"]["podAntiAffinity"].pop(
        "requiredDuringSchedulingIgnoredDuringExecution"
    )[0]
    pod(sts)["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"] = [
        {"weight": 100, "podAffinityTerm": term}
    ]
    assert rules.rabbitmq_statefulset_ha(STS, sts, production=False) == []
    [message] = rules.rabbitmq_statefulset_ha(STS, sts, production=True)
    assert "required" in message


def test_rabbitmq_statefulset_without_volume_claims_fails() -> None:
    sts = rabbitmq_statefulset()
    del sts["spec"]["volumeClaimTemplates"]
    [message] = rules.rabbitmq_statefulset_ha(STS, sts, production=False)
    assert "volumeClaimTemplates" in message


def test_other_statefulsets_are_not_rabbitmq() -> None:
    sts = rabbitmq_statefulset()
    for container in pod(sts)["containers"]:
        container["image"] = "postgres:17"
    del sts["spec"]["volumeClaimTemplates"]
    assert not rules.is_rabbitmq_statefulset(STS, sts)
    assert rules.rabbitmq_statefulset_ha(STS, sts, production=True) == []
    # The image decides, whatever the registry, tag or digest.
    assert rules._image_name("docker.io/library/rabbitmq:4.1@sha256:ab") == "rabbitmq"


# --- replicas -------------------------------------------------------------------------


@pytest.mark.parametrize("replicas", [3, 5, 7])
def test_odd_replicas_of_at_least_three_pass_in_production(replicas: int) -> None:
    sts = rabbitmq_statefulset(replicas=replicas)
    assert rules.rabbitmq_replicas(STS, sts, production=True) == []


@pytest.mark.parametrize("replicas", [1, 2, 4, 6, None])
def test_even_or_small_replicas_fail_in_production(replicas: int | None) -> None:
    sts = rabbitmq_statefulset(replicas=replicas)
    if replicas is None:
        del sts["spec"]["replicas"]  # Kubernetes' default: 1
    [message] = rules.rabbitmq_replicas(STS, sts, production=True)
    assert "odd number >= 3" in message


def test_any_replica_count_passes_outside_production() -> None:
    assert rules.rabbitmq_replicas(STS, rabbitmq_statefulset(replicas=1), production=False) == []


# --- credentials ------------------------------------------------------------------------


def test_cookie_from_a_secret_volume_and_an_app_user_pass() -> None:
    conf = "default_user = celery\ndefault_pass = s3cret\n"
    definitions = json.dumps({"users": [{"name": "celery"}]})
    assert rules.rabbitmq_credentials(STS, rabbitmq_statefulset()) == []
    assert rules.rabbitmq_credentials(rules.SECRET, secret(conf=conf, defs=definitions)) == []
    # A comment naming guest is not a guest user.
    assert rules.rabbitmq_credentials(rules.SECRET, secret(conf="# replaces guest\n")) == []


def test_cookie_from_a_secret_key_ref_passes() -> None:
    sts = rabbitmq_statefulset()
    pod(sts)["volumes"] = []
    pod(sts)["containers"][0]["env"] = [
        {
            "name": "RABBITMQ_ERLANG_COOKIE",
            "valueFrom": {"secretKeyRef": {"name": "rabbitmq", "key": ".erlang.cookie"}},
        }
    ]
    assert rules.rabbitmq_credentials(STS, sts) == []


def test_literal_cookie_in_env_fails() -> None:
    sts = rabbitmq_statefulset()
    pod(sts)["containers"][0]["env"] = [{"name": "RABBITMQ_ERLANG_COOKIE", "value": "changeThis"}]
    messages = rules.rabbitmq_credentials(STS, sts)
    assert any("literal" in m for m in messages)
    assert any("changeThis" in m for m in messages)


def test_cookie_not_from_a_secret_fails() -> None:
    sts = rabbitmq_statefulset()
    pod(sts)["volumes"] = [{"name": "home", "emptyDir": {}}]
    [message] = rules.rabbitmq_credentials(STS, sts)
    assert "does not come from a Secret" in message


def test_cookie_in_a_config_map_fails() -> None:
    messages = rules.rabbitmq_credentials(rules.CONFIG_MAP, config_map(**{".erlang.cookie": "abc"}))
    assert any("belongs in a Secret" in m for m in messages)


def test_the_articles_cookie_fails_anywhere() -> None:
    cm = config_map(**{"setup.sh": "echo changeThis > /var/lib/rabbitmq/.erlang.cookie"})
    [message] = rules.rabbitmq_credentials(rules.CONFIG_MAP, cm)
    assert "changeThis" in message


@pytest.mark.parametrize(
    ("make", "type_"),
    [
        (lambda: config_map(**{"rabbitmq.conf": "default_user = guest\n"}), rules.CONFIG_MAP),
        (lambda: secret(conf="default_pass = guest"), rules.SECRET),
        (
            lambda: secret(defs=json.dumps({"users": [{"name": "guest", "tags": "admin"}]})),
            rules.SECRET,
        ),
        (
            # base64 data is read too
            lambda: {"metadata": {"name": "s"}, "data": {"c": "ZGVmYXVsdF91c2VyID0gZ3Vlc3QK"}},
            rules.SECRET,
        ),
    ],
)
def test_a_guest_user_fails(make: Callable[[], dict[str, Any]], type_: str) -> None:
    [message] = rules.rabbitmq_credentials(type_, make())
    assert "guest" in message


def test_guest_from_env_fails() -> None:
    sts = rabbitmq_statefulset()
    pod(sts)["containers"][0]["env"] = [{"name": "RABBITMQ_DEFAULT_USER", "value": "guest"}]
    [message] = rules.rabbitmq_credentials(STS, sts)
    assert "guest" in message


def test_redacted_plan_values_are_not_read_as_credentials() -> None:
    redacted = {"metadata": {"name": "s"}, "data": {".erlang.cookie": "[secret]"}}
    assert rules.rabbitmq_credentials(rules.SECRET, redacted) == []


# --- management UI -------------------------------------------------------------------------


def service(type_: str, port: int | str = 15672) -> dict[str, Any]:
    return {
        "metadata": {"name": "rabbitmq", "namespace": "rabbitmq"},
        "spec": {"type": type_, "ports": [{"name": "ui", "port": 8080, "targetPort": port}]},
    }


def test_cluster_ip_management_service_passes() -> None:
    assert rules.management_ui_not_exposed(rules.SERVICE, service("ClusterIP")) == []
    assert rules.management_ui_not_exposed(rules.SERVICE, service("LoadBalancer", 5672)) == []


@pytest.mark.parametrize("type_", ["LoadBalancer", "NodePort"])
@pytest.mark.parametrize("port", [15672, "management"])
def test_management_behind_a_load_balancer_or_node_port_fails(type_: str, port: int | str) -> None:
    [message] = rules.management_ui_not_exposed(rules.SERVICE, service(type_, port))
    assert "15672" in message and type_ in message


def test_management_behind_an_ingress_fails() -> None:
    backend: dict[str, Any] = {"service": {"name": "rabbitmq", "port": {"number": 15672}}}
    ingress: dict[str, Any] = {
        "metadata": {"name": "ui", "namespace": "rabbitmq"},
        "spec": {
            "rules": [
                {
                    "http": {
                        "paths": [
                            {
                                "path": "/",
                                "backend": backend,
                            }
                        ]
                    }
                }
            ]
        },
    }
    [message] = rules.management_ui_not_exposed(INGRESS, ingress)
    assert "Ingress" in message
    backend["service"]["port"] = {"number": 80}
    assert rules.management_ui_not_exposed(INGRESS, ingress) == []


# --- containers ------------------------------------------------------------------------------


def test_containers_with_requests_and_non_root_pass() -> None:
    assert rules.containers_hardened(STS, rabbitmq_statefulset()) == []
    assert rules.containers_hardened(DEPLOYMENT, worker_deployment()) == []


def test_a_container_without_requests_fails() -> None:
    sts = rabbitmq_statefulset()
    del pod(sts)["initContainers"][0]["resources"]
    [message] = rules.containers_hardened(STS, sts)
    assert "setup" in message and "cpu or memory request" in message


def test_a_container_without_a_memory_request_fails() -> None:
    deployment = worker_deployment()
    pod(deployment)["containers"][0]["resources"] = {"requests": {"cpu": "1"}}
    [message] = rules.containers_hardened(DEPLOYMENT, deployment)
    assert "no memory request" in message


@pytest.mark.parametrize(
    ("pod_context", "container_context", "non_root"),
    [
        ({"runAsNonRoot": True}, None, True),
        ({"runAsUser": 1000}, None, True),
        (None, {"runAsNonRoot": True}, True),
        (None, {"runAsUser": 10001}, True),
        ({"runAsNonRoot": True}, {"runAsUser": 0}, False),  # the container wins
        ({"runAsUser": 0}, None, False),
        (None, None, False),
        ({"runAsUser": 1000, "runAsNonRoot": False}, None, False),
        ({"runAsNonRoot": False}, {"runAsNonRoot": True}, True),
    ],
)
def test_non_root_at_pod_or_container_level(
    pod_context: dict[str, Any] | None, container_context: dict[str, Any] | None, non_root: bool
) -> None:
    deployment = worker_deployment()
    pod(deployment).pop("securityContext")
    if pod_context is not None:
        pod(deployment)["securityContext"] = pod_context
    if container_context is not None:
        pod(deployment)["containers"][0]["securityContext"] = container_context
    messages = rules.containers_hardened(DEPLOYMENT, deployment)
    assert (messages == []) is non_root, messages


def test_cron_job_pods_are_checked() -> None:
    cron = {
        "metadata": {"name": "c", "namespace": "workers"},
        "spec": {"jobTemplate": {"spec": {"template": {"spec": {"containers": [{"name": "x"}]}}}}},
    }
    assert len(rules.containers_hardened("kubernetes:batch/v1:CronJob", cron)) == 2


# --- GKE ---------------------------------------------------------------------------------------


def test_production_cluster_with_deletion_protection_passes() -> None:
    cluster = {"name": "celery", "deletionProtection": True}
    assert rules.gke_deletion_protection(rules.GKE_CLUSTER, cluster, production=True) == []
    # pulumi-gcp's default is true.
    assert rules.gke_deletion_protection(rules.GKE_CLUSTER, {}, production=True) == []


def test_production_cluster_without_deletion_protection_fails() -> None:
    cluster = {"name": "celery", "deletionProtection": False}
    [message] = rules.gke_deletion_protection(rules.GKE_CLUSTER, cluster, production=True)
    assert "deletionProtection" in message
    assert rules.gke_deletion_protection(rules.GKE_CLUSTER, cluster, production=False) == []


# --- PodDisruptionBudgets ---------------------------------------------------------------------


def _without_budget(namespace: str) -> list[tuple[str, dict[str, Any]]]:
    return [r for r in _stack() if r[0] != rules.PDB or r[1]["metadata"]["namespace"] != namespace]


def _stack() -> list[tuple[str, dict[str, Any]]]:
    return [
        (STS, rabbitmq_statefulset()),
        (DEPLOYMENT, worker_deployment()),
        (rules.PDB, pdb("rabbitmq", {"app.kubernetes.io/name": "rabbitmq"})),
        (rules.PDB, pdb("workers", {"app.kubernetes.io/name": "celery-worker"})),
    ]


def test_workloads_covered_by_budgets_pass() -> None:
    assert rules.pod_disruption_budgets(_stack()) == []


def test_a_workload_without_a_budget_fails() -> None:
    stack = [
        r for r in _stack() if r[1]["metadata"].get("namespace") != "workers" or r[0] != rules.PDB
    ]
    [message] = rules.pod_disruption_budgets(stack)
    assert "celery-worker" in message


@pytest.mark.parametrize(
    "budget",
    [
        pdb("workers", {"app.kubernetes.io/name": "rabbitmq"}),  # wrong namespace
        pdb("rabbitmq", {"app.kubernetes.io/name": "other"}),  # selects nothing of it
        {"metadata": {"namespace": "rabbitmq"}, "spec": {"selector": {}}},  # empty selector
    ],
)
def test_a_budget_that_does_not_select_the_pods_does_not_count(budget: dict[str, Any]) -> None:
    stack = [
        r for r in _stack() if r[1]["metadata"].get("namespace") != "rabbitmq" or r[0] != rules.PDB
    ]
    stack.append((rules.PDB, budget))
    [message] = rules.pod_disruption_budgets(stack)
    assert "rabbitmq-server" in message


def test_match_expressions_are_understood() -> None:
    budget = copy.deepcopy(pdb("rabbitmq", {}))
    budget["spec"]["selector"] = {
        "matchExpressions": [
            {"key": "app.kubernetes.io/name", "operator": "In", "values": ["rabbitmq"]}
        ]
    }
    stack = [
        r for r in _stack() if r[1]["metadata"].get("namespace") != "rabbitmq" or r[0] != rules.PDB
    ]
    assert rules.pod_disruption_budgets([*stack, (rules.PDB, budget)]) == []
