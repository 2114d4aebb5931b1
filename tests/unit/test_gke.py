"""The GKE component, as every stack file registers it under mocks."""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any

import pytest
import yaml

from components.config import load_stack_config
from components.gcp_ids import stack_id
from components.gke import AUTH_PLUGIN, NODE_ROLES, GkeClusterArgs
from tools.mockrun import (
    MOCK_CLUSTER_DNS,
    MOCK_CLUSTER_IP,
    ProgramRun,
    is_secret,
    reveal,
    run_program,
    stack_config,
)

CLUSTER = "gcp:container/cluster:Cluster"
NODE_POOL = "gcp:container/nodePool:NodePool"
MAIN_POOL = "celery-pool"  # RabbitMQ's alone when gke.workerPool is on
WORKER_POOL_NAME = "celery-worker-pool"
ACCOUNT = "gcp:serviceaccount/account:Account"
REPOSITORY = "gcp:artifactregistry/repository:Repository"
IAM_MEMBER = "gcp:projects/iAMMember:IAMMember"
# The inputs through which a program names a GCP object itself (no auto-naming).
GCP_ID_INPUTS = ("name", "accountId", "repositoryId")
_SERVICE_ACCOUNT_ID = re.compile(r"^[a-z][-a-z0-9]{4,28}[a-z0-9]$")
_REPOSITORY_ID = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^[-_a-z0-9]{0,63}$")


def _config(run: ProgramRun):
    return load_stack_config(stack_config(run.stack), run.stack)


def _with_gke(stack: str, **values: Any) -> dict[str, Any]:
    config = copy.deepcopy(stack_config(stack))
    config["celery-cluster:gke"] = {**config["celery-cluster:gke"], **values}
    return config


def _run(config: dict[str, Any], stack: str) -> ProgramRun:
    run = run_program(config, stack)
    assert run.error is None, repr(run.error)
    return run


def _explicit_gcp_ids(run: ProgramRun) -> set[tuple[str, str]]:
    return {
        (r.type, r.inputs[key])
        for r in run.resources
        if r.custom and r.type.startswith("gcp:")
        for key in GCP_ID_INPUTS
        if key in r.input_keys
    }


def test_exactly_one_cluster_with_the_default_pool_removed(stack_run: ProgramRun) -> None:
    cluster = stack_run.one(CLUSTER)
    inputs = cluster.inputs
    assert inputs["removeDefaultNodePool"] is True
    assert inputs["networkingMode"] == "VPC_NATIVE"
    assert inputs["ipAllocationPolicy"] == {
        "clusterSecondaryRangeName": "pods",
        "servicesSecondaryRangeName": "services",
    }
    assert inputs["enableShieldedNodes"] is True
    assert inputs["releaseChannel"]["channel"] in ("RAPID", "REGULAR", "STABLE")
    assert inputs["workloadIdentityConfig"]["workloadPool"] == "celery-cluster-test.svc.id.goog"
    assert inputs["addonsConfig"]["gcePersistentDiskCsiDriverConfig"]["enabled"] is True


def test_deletion_protection_and_protect_follow_the_environment(stack_run: ProgramRun) -> None:
    config = _config(stack_run)
    cluster = stack_run.one(CLUSTER)
    pool = stack_run.one(NODE_POOL, MAIN_POOL)
    assert cluster.inputs["deletionProtection"] is config.gke.deletion_protection
    assert cluster.protect is config.production
    assert pool.protect is config.production
    if config.production:
        assert cluster.inputs["deletionProtection"] is True
    else:
        # dev must go away with one `pulumi destroy`.
        assert cluster.inputs["deletionProtection"] is False


def test_the_node_pool_gives_at_least_three_nodes(stack_run: ProgramRun) -> None:
    config = _config(stack_run)
    pool = reveal(stack_run.one(NODE_POOL, MAIN_POOL).inputs)
    zones = 1 if config.gke.zone else 3
    assert pool["location"] == config.gke.location
    assert pool["nodeCount"] * zones >= 3
    assert pool["management"] == {"autoRepair": True, "autoUpgrade": True}
    node = pool["nodeConfig"]
    assert node["spot"] is (not config.production)
    assert node["machineType"] == config.gke.machine_type
    assert node["diskType"] == config.gke.disk_type
    assert node["shieldedInstanceConfig"] == {
        "enableSecureBoot": True,
        "enableIntegrityMonitoring": True,
    }
    assert node["workloadMetadataConfig"] == {"mode": "GKE_METADATA"}


def test_nodes_run_as_a_dedicated_least_privilege_account(stack_run: ProgramRun) -> None:
    account = stack_run.one(ACCOUNT)
    email = f"{account.inputs['accountId']}@celery-cluster-test.iam.gserviceaccount.com"
    pool = stack_run.one(NODE_POOL, MAIN_POOL).inputs["nodeConfig"]
    cluster = stack_run.one(CLUSTER).inputs["nodeConfig"]
    assert pool["serviceAccount"] == email
    assert cluster["serviceAccount"] == email  # even the short-lived default pool
    assert _SERVICE_ACCOUNT_ID.match(account.inputs["accountId"])
    assert stack_run.stack in account.inputs["accountId"]
    assert "compute@developer" not in email
    roles = sorted(r.inputs["role"] for r in stack_run.of_type("gcp:projects/iAMMember:IAMMember"))
    assert roles == sorted(NODE_ROLES)
    assert all("owner" not in role and "editor" not in role for role in roles)
    members = {r.inputs["member"] for r in stack_run.of_type("gcp:projects/iAMMember:IAMMember")}
    assert members == {f"serviceAccount:{email}"}


def test_vpc_native_network(stack_run: ProgramRun) -> None:
    network = stack_run.one("gcp:compute/network:Network")
    assert network.inputs["autoCreateSubnetworks"] is False
    subnet = stack_run.one("gcp:compute/subnetwork:Subnetwork").inputs
    assert {r["rangeName"] for r in subnet["secondaryIpRanges"]} == {"pods", "services"}
    assert subnet["privateIpGoogleAccess"] is True


def test_kubeconfig_is_a_secret_that_uses_the_auth_plugin(stack_run: ProgramRun) -> None:
    assert "kubeconfig" in stack_run.secret_outputs
    kubeconfig = yaml.safe_load(stack_run.outputs["kubeconfig"])
    user = kubeconfig["users"][0]["user"]
    assert user["exec"]["command"] == AUTH_PLUGIN
    assert "token" not in user and "password" not in user
    # Every stack file reaches the control plane through its DNS endpoint, which
    # serves a publicly trusted certificate: no cluster CA is pinned for it.
    assert _config(stack_run).gke.control_plane == "dns"
    assert kubeconfig["clusters"][0]["cluster"] == {"server": f"https://{MOCK_CLUSTER_DNS}"}

    provider = stack_run.one("pulumi:providers:kubernetes")
    assert is_secret(provider.inputs["kubeconfig"])
    assert yaml.safe_load(reveal(provider.inputs["kubeconfig"])) == kubeconfig


def test_every_kubernetes_object_goes_through_the_cluster_provider(stack_run: ProgramRun) -> None:
    provider = stack_run.one("pulumi:providers:kubernetes")
    objects = list(stack_run.kubernetes_objects())
    assert objects
    for registered, _ in objects:
        assert registered.provider.startswith(provider.urn), registered.name


def test_outputs_name_the_cluster(stack_run: ProgramRun) -> None:
    assert stack_run.outputs["cluster_name"] == "celery"
    assert stack_run.outputs["endpoint"] == MOCK_CLUSTER_DNS


# --- two stacks in one GCP project ----------------------------------------------------


def test_two_stacks_in_one_gcp_project_share_no_gcp_id() -> None:
    runs = {
        stack: _run(stack_config(stack, gcp_project="shared-project-1"), stack)
        for stack in ("dev", "prod")
    }
    dev, prod = (_explicit_gcp_ids(runs[s]) for s in ("dev", "prod"))
    # Not vacuous: the node service account and the image repository are named.
    for ids in (dev, prod):
        assert {type_ for type_, _ in ids} >= {ACCOUNT, REPOSITORY}
    assert dev.isdisjoint(prod), dev & prod
    # The rest is auto-named by Pulumi (a random suffix per stack).
    for r in runs["prod"].of_type(CLUSTER) + runs["prod"].of_type(NODE_POOL):
        assert "name" not in r.input_keys


@pytest.mark.parametrize(
    "stack",
    [
        "dev",
        "feature-a-rather-long-branch-name-for-a-preview-environment-2025",
        "Feature_Branch.V2",
        "x",
    ],
)
def test_any_stack_name_gives_valid_gcp_ids(stack: str) -> None:
    run = _run(stack_config("dev"), stack)
    assert _SERVICE_ACCOUNT_ID.match(run.one(ACCOUNT).inputs["accountId"])
    assert _REPOSITORY_ID.match(run.one(REPOSITORY).inputs["repositoryId"])
    assert _LABEL_VALUE.match(run.one(NODE_POOL, MAIN_POOL).inputs["nodeConfig"]["labels"]["stack"])


def test_shortened_stack_names_stay_distinct() -> None:
    long = "feature-a-rather-long-branch-name-for-a-preview-"
    names = [long + "one", long + "two", "Dev", "dev", "dev.", "dev_"]
    ids = [stack_id("celery-nodes", name, 30) for name in names]
    assert len(set(ids)) == len(names), ids
    assert all(_SERVICE_ACCOUNT_ID.match(i) for i in ids), ids
    assert stack_id("celery-nodes", "prod", 30) == "celery-nodes-prod"


# --- the cluster's version, node config and dependencies -------------------------------


def test_the_cluster_runs_the_release_channels_version_unless_pinned(
    stack_run: ProgramRun,
) -> None:
    assert "minMasterVersion" not in stack_run.one(CLUSTER).input_keys
    pinned = _run(_with_gke("dev", minMasterVersion="1.33.5-gke.1000"), "dev")
    assert pinned.one(CLUSTER).inputs["minMasterVersion"] == "1.33.5-gke.1000"


def test_the_cluster_ignores_the_node_config_gke_reports(stack_run: ProgramRun) -> None:
    # Its own option: ignore_changes does not flow from the component to children.
    assert stack_run.one(CLUSTER).ignore_changes == ["nodeConfig"]
    assert stack_run.one(NODE_POOL, MAIN_POOL).ignore_changes == []


def test_the_cluster_and_its_pool_wait_for_the_node_roles(stack_run: ProgramRun) -> None:
    bindings = {r.urn for r in stack_run.of_type(IAM_MEMBER)}
    assert len(bindings) == len(NODE_ROLES)
    assert bindings <= set(stack_run.one(CLUSTER).dependencies)
    assert bindings <= set(stack_run.one(NODE_POOL, MAIN_POOL).dependencies)


# --- the control plane ---------------------------------------------------------------------


def test_the_control_plane_answers_only_on_its_iam_gated_dns_endpoint(
    stack_run: ProgramRun,
) -> None:
    cluster = stack_run.one(CLUSTER)
    endpoints = cluster.inputs["controlPlaneEndpointsConfig"]
    assert endpoints["ipEndpointsConfig"] == {"enabled": False}
    assert endpoints["dnsEndpointConfig"]["allowExternalTraffic"] is True
    # The block would turn IP access back on.
    assert "masterAuthorizedNetworksConfig" not in cluster.input_keys


def test_the_ip_endpoint_admits_only_the_authorized_networks() -> None:
    config = _with_gke("dev", controlPlane="ip", authorizedNetworks=["198.51.100.0/24"])
    run = _run(config, "dev")
    cluster = run.one(CLUSTER).inputs
    assert cluster["controlPlaneEndpointsConfig"]["ipEndpointsConfig"] == {"enabled": True}
    assert cluster["controlPlaneEndpointsConfig"]["dnsEndpointConfig"]["allowExternalTraffic"] is (
        False
    )
    assert cluster["masterAuthorizedNetworksConfig"] == {
        "cidrBlocks": [{"cidrBlock": "198.51.100.0/24", "displayName": "authorized-0"}],
        "gcpPublicCidrsAccessEnabled": False,
    }
    kubeconfig = yaml.safe_load(run.outputs["kubeconfig"])
    assert kubeconfig["clusters"][0]["cluster"] == {
        "certificate-authority-data": "TU9DSy1DQQ==",
        "server": f"https://{MOCK_CLUSTER_IP}",
    }
    assert run.outputs["endpoint"] == MOCK_CLUSTER_IP


def test_gke_cluster_args_hold_only_what_the_cluster_needs() -> None:
    config = load_stack_config(stack_config("prod"), "prod")
    args = GkeClusterArgs.from_stack(config)
    assert args == GkeClusterArgs(
        project=config.gcp_project, stack="prod", gke=config.gke, protect=True, dedicated_pools=True
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.protect = False  # type: ignore[misc]
