"""Bad input fails before anything is created, naming the key, the value and what is allowed."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from components.config import ConfigError, StackConfig, load_stack_config
from tools.mockrun import run_program, stack_config, stack_names


def _with(stack: str, key: str, path: list[str], value: Any) -> dict[str, Any]:
    """The stack file's config with one nested value replaced (or a key added)."""
    config = copy.deepcopy(stack_config(stack))
    node = config.setdefault(key, {})
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    return config


def _rejected(config: dict[str, Any], stack: str, *fragments: str) -> ConfigError:
    run = run_program(config, stack)
    assert isinstance(run.error, ConfigError), f"expected a ConfigError, got {run.error!r}"
    message = str(run.error)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert run.resources == [], "a rejected config must register nothing"
    return run.error


@pytest.mark.parametrize("stack", stack_names())
def test_unknown_top_level_key_is_rejected(stack: str) -> None:
    config = stack_config(stack)
    config["celery-cluster:rabbitmqq"] = {"replicas": 3}
    _rejected(config, stack, "celery-cluster:rabbitmqq", "unknown key", "did you mean 'rabbitmq'")


@pytest.mark.parametrize("stack", stack_names())
def test_unknown_nested_key_is_rejected(stack: str) -> None:
    config = _with(stack, "celery-cluster:rabbitmq", ["replica"], 3)
    _rejected(config, stack, "celery-cluster:rabbitmq.replica", "did you mean 'replicas'")


def test_unknown_key_deep_inside_is_rejected() -> None:
    config = _with("prod", "celery-cluster:workers", ["resources", "cpuLimt"], "1")
    _rejected(config, "prod", "celery-cluster:workers.resources.cpuLimt", "cpuLimit")


@pytest.mark.parametrize("replicas", [1, 2, 4])
def test_production_needs_an_odd_majority_of_rabbitmq_nodes(replicas: int) -> None:
    config = _with("prod", "celery-cluster:rabbitmq", ["replicas"], replicas)
    _rejected(config, "prod", "celery-cluster:rabbitmq.replicas", repr(replicas), "odd number >= 3")


def test_development_may_run_a_single_rabbitmq_node() -> None:
    config = _with("dev", "celery-cluster:rabbitmq", ["replicas"], 1)
    assert run_program(config, "dev").error is None


@pytest.mark.parametrize("size", ["10GB", "10", "ten", "0Gi", "1.5Gi"])
def test_malformed_storage_size_is_rejected(size: str) -> None:
    config = _with("prod", "celery-cluster:rabbitmq", ["storageSize"], size)
    _rejected(config, "prod", "celery-cluster:rabbitmq.storageSize", repr(size), "10Gi")


@pytest.mark.parametrize("machine", ["e2 standard 2", "E2-STANDARD-2", "standard", ""])
def test_malformed_machine_type_is_rejected(machine: str) -> None:
    config = _with("dev", "celery-cluster:gke", ["machineType"], machine)
    _rejected(config, "dev", "celery-cluster:gke.machineType", repr(machine), "machine type")


@pytest.mark.parametrize("replicas", [0, -1])
def test_worker_replicas_below_one_are_rejected(replicas: int) -> None:
    config = _with("dev", "celery-cluster:workers", ["replicas"], replicas)
    _rejected(config, "dev", "celery-cluster:workers.replicas", repr(replicas), ">= 1")


def test_zone_outside_the_region_is_rejected() -> None:
    config = _with("dev", "celery-cluster:gke", ["zone"], "europe-west1-b")
    _rejected(config, "dev", "celery-cluster:gke.zone", "'europe-west1-b'", "'us-east1'")


@pytest.mark.parametrize("stack", stack_names())
def test_missing_gcp_project_is_rejected_for_the_gke_target(stack: str) -> None:
    config = stack_config(stack, gcp_project=None)
    config.pop("gcp:project", None)
    _rejected(config, stack, "gcp:project", "pulumi config set gcp:project")


def test_existing_target_needs_no_gcp_project() -> None:
    config = stack_config("dev", gcp_project=None)
    config["celery-cluster:target"] = "existing"
    config["celery-cluster:rabbitmq"] = {
        **config["celery-cluster:rabbitmq"],
        "storageClass": "standard",
    }
    config["celery-cluster:workers"] = {
        **config["celery-cluster:workers"],
        "image": "example/celery:1.0",
    }
    run = run_program(config, "dev")
    assert run.error is None
    assert not [r for r in run.resources if r.type.startswith("gcp:")]


@pytest.mark.parametrize(
    ("key", "path", "value", "allowed"),
    [
        ("celery-cluster:target", [], "aks", "'gke', 'existing'"),
        ("celery-cluster:environment", [], "staging", "'development', 'production'"),
        ("celery-cluster:rabbitmq", ["replicas"], "3", "an integer"),
        ("celery-cluster:rabbitmq", ["antiAffinity"], "soft", "'required', 'preferred'"),
        ("celery-cluster:rabbitmq", ["pvcRetention"], "Keep", "'Retain', 'Delete'"),
        ("celery-cluster:rabbitmq", ["image"], "rabbitmq:latest", "no pinned version tag"),
        ("celery-cluster:rabbitmq", ["image"], "rabbitmq@sha256:" + "a" * 64, "no pinned version"),
        ("celery-cluster:rabbitmq", ["image"], "bitnami/rabbitmq:3.13.7", "not the official image"),
        ("celery-cluster:rabbitmq", ["image"], "rabbitmq:4.1.4", "not the management variant"),
        ("celery-cluster:workers", ["image"], "example/celery", "pinned tag or digest"),
        ("celery-cluster:workers", ["image"], "example/celery:latest", "pinned tag or digest"),
        ("celery-cluster:gke", ["spot"], "yes", "true or false"),
        ("celery-cluster:gke", ["subnetCidr"], "10.0.0.0/33", "CIDR"),
        ("celery-cluster:kubernetes", ["version"], "1.20", "1.33"),
        ("celery-cluster:gke", ["minMasterVersion"], "latest", "a GKE version such as 1.33"),
        ("celery-cluster:gke", ["minMasterVersion"], "v1.33", "a GKE version such as 1.33"),
        ("celery-cluster:gke", ["minMasterVersion"], "1.33.5-gke", "1.33.5-gke.1000"),
        ("celery-cluster:gke", ["minMasterVersion"], "1.32", "at least kubernetes.version"),
        ("celery-cluster:gke", ["controlPlane"], "public", "'dns', 'ip'"),
        ("celery-cluster:gke", ["authorizedNetworks"], "10.0.0.0/8", "a list"),
        ("celery-cluster:workers", ["pool"], "gevent", "'threads', 'prefork', 'solo'"),
        ("celery-cluster:rabbitmq", ["netTicktimeSeconds"], 2, "an integer from 5 to 120"),
        ("celery-cluster:rabbitmq", ["netTicktimeSeconds"], 600, "an integer from 5 to 120"),
        ("celery-cluster:rabbitmq", ["netTicktimeSeconds"], "10", "an integer"),
        ("celery-cluster:workers", ["scheduler", "publishWindow"], 0, "an integer from 1 to"),
        ("celery-cluster:workers", ["scheduler", "publishWindow"], 20000, "from 1 to 10000"),
        ("celery-cluster:workers", ["resources", "memoryRequest"], "lots", "Kubernetes quantity"),
    ],
)
def test_malformed_values_name_key_value_and_allowed(
    key: str, path: list[str], value: Any, allowed: str
) -> None:
    if path:
        config = _with("dev", key, path, value)
        full_key = f"{key}.{'.'.join(path)}"
    else:
        config = stack_config("dev")
        config[key] = value
        full_key = key
    _rejected(config, "dev", full_key, repr(value), allowed)


@pytest.mark.parametrize("stack", stack_names())
def test_control_plane_access_and_its_networks_must_agree(stack: str) -> None:
    no_networks = _with(stack, "celery-cluster:gke", ["controlPlane"], "ip")
    _rejected(no_networks, stack, "celery-cluster:gke.authorizedNetworks", "at least one CIDR")
    unused = _with(stack, "celery-cluster:gke", ["authorizedNetworks"], ["198.51.100.0/24"])
    _rejected(unused, stack, "celery-cluster:gke.authorizedNetworks", "198.51.100.0/24", "'dns'")
    malformed = copy.deepcopy(no_networks)
    malformed["celery-cluster:gke"]["authorizedNetworks"] = ["0.0.0.0/99"]
    _rejected(malformed, stack, "celery-cluster:gke.authorizedNetworks[0]", "'0.0.0.0/99'", "CIDR")


def test_production_needs_resource_limits() -> None:
    config = _with(
        "prod", "celery-cluster:workers", ["resources"], {"cpuRequest": "1", "memoryRequest": "1Gi"}
    )
    _rejected(config, "prod", "celery-cluster:workers.resources", "cpuLimit and memoryLimit")


def test_required_anti_affinity_needs_a_node_per_rabbitmq_pod() -> None:
    config = _with("prod", "celery-cluster:rabbitmq", ["replicas"], 5)
    _rejected(config, "prod", "celery-cluster:rabbitmq.replicas", "at most the 3 node(s)")


def test_a_digest_may_follow_the_rabbitmq_version_tag() -> None:
    image = "rabbitmq:4.1.4-management@sha256:" + "b" * 64
    config = _with("prod", "celery-cluster:rabbitmq", ["image"], image)
    assert load_stack_config(config, "prod").rabbitmq.version == "4.1.4"


def test_defaults_are_the_durable_choice() -> None:
    config = load_stack_config({"gcp:project": "my-project-1"}, "scratch")
    assert isinstance(config, StackConfig)
    assert config.production
    assert config.gke.deletion_protection is True
    assert config.rabbitmq.pvc_retention == "Retain"
    assert config.rabbitmq.anti_affinity == "required"
    assert config.rabbitmq.replicas == 3
    # The control plane only on its IAM-gated DNS endpoint; the channel's version.
    assert config.gke.control_plane == "dns"
    assert config.gke.min_master_version is None


def test_stack_files_differ_where_the_issue_says() -> None:
    dev = load_stack_config(stack_config("dev"), "dev")
    prod = load_stack_config(stack_config("prod"), "prod")
    assert (dev.gke.spot, prod.gke.spot) == (True, False)
    assert (dev.gke.deletion_protection, prod.gke.deletion_protection) == (False, True)
    assert (dev.rabbitmq.pvc_retention, prod.rabbitmq.pvc_retention) == ("Delete", "Retain")
    assert (dev.rabbitmq.storage_class, prod.rabbitmq.storage_class) == ("pd-balanced", "pd-ssd")
    assert dev.gke.disk_type == "pd-standard"
    assert (dev.protect, prod.protect) == (False, True)
    assert prod.rabbitmq.resources.cpu_limit and prod.workers.resources.memory_limit


@pytest.mark.parametrize("stack", stack_names())
def test_every_stack_needs_a_rabbitmq_memory_limit(stack: str) -> None:
    """Without one, RabbitMQ sizes its memory alarm from the node and is OOM-killed."""
    config = copy.deepcopy(stack_config(stack))
    resources = dict(config["celery-cluster:rabbitmq"]["resources"])
    resources.pop("memoryLimit")
    config["celery-cluster:rabbitmq"] = {
        **config["celery-cluster:rabbitmq"],
        "resources": resources,
    }
    _rejected(
        config, stack, "celery-cluster:rabbitmq.resources.memoryLimit", "None", "at least 256Mi"
    )


def test_rabbitmq_memory_request_above_its_limit_is_rejected() -> None:
    config = _with("dev", "celery-cluster:rabbitmq", ["resources", "memoryRequest"], "2Gi")
    _rejected(config, "dev", "celery-cluster:rabbitmq.resources.memoryRequest", "'2Gi'", "at most")


def test_a_volume_smaller_than_the_disk_alarm_allows_is_rejected() -> None:
    # prod: 4Gi limit -> 3.2 GiB for RabbitMQ -> 4.8 GiB kept free: 9Gi is too small.
    config = _with("prod", "celery-cluster:rabbitmq", ["storageSize"], "9Gi")
    _rejected(config, "prod", "celery-cluster:rabbitmq.storageSize", "'9Gi'", "4.80 GiB", "1.5 x")
    fits = _with("prod", "celery-cluster:rabbitmq", ["storageSize"], "10Gi")
    assert run_program(fits, "prod").error is None


def test_pulumi_yaml_declares_every_top_level_key_the_program_reads() -> None:
    """`pulumi config` and the project's readers see each key, with its sub-keys named."""
    import yaml

    from components import config as stack_config_module

    project = yaml.safe_load((Path(__file__).parents[2] / "Pulumi.yaml").read_text())
    declared = set(project["config"])
    assert declared == set(stack_config_module._TOP_LEVEL), declared ^ set(
        stack_config_module._TOP_LEVEL
    )
    described = project["config"]["autoscaling"]["description"]
    for key in ("keda", "minReplicas", "maxReplicas", "messagesPerReplica", "cooldownSeconds"):
        assert key in described, key
    assert "workerPool" in project["config"]["gke"]["description"]
