"""The GKE component, as every stack file registers it under mocks."""

from __future__ import annotations

import yaml

from components.config import load_stack_config
from components.gke import AUTH_PLUGIN, NODE_ROLES
from tests.program import ProgramRun, is_secret, reveal, stack_config

CLUSTER = "gcp:container/cluster:Cluster"
NODE_POOL = "gcp:container/nodePool:NodePool"
ACCOUNT = "gcp:serviceaccount/account:Account"


def _config(run: ProgramRun):
    return load_stack_config(stack_config(run.stack), run.stack)


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
    pool = stack_run.one(NODE_POOL)
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
    pool = reveal(stack_run.one(NODE_POOL).inputs)
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
    pool = stack_run.one(NODE_POOL).inputs["nodeConfig"]
    cluster = stack_run.one(CLUSTER).inputs["nodeConfig"]
    assert pool["serviceAccount"] == email
    assert cluster["serviceAccount"] == email  # even the short-lived default pool
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
    assert kubeconfig["clusters"][0]["cluster"]["server"] == "https://203.0.113.10"

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
    assert stack_run.outputs["endpoint"] == "203.0.113.10"
