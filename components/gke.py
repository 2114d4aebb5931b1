"""The GKE cluster: network, node service account, cluster, node pool, provider.

One small function per GCP object; `GkeCluster` assembles them. The cluster's
default node pool is removed and replaced by a separately managed pool, so a
node-pool change (machine type, spot) never forces the cluster itself to be
replaced.
"""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp
import pulumi_kubernetes as k8s

from components.config import GkeConfig, StackConfig

# Roles a GKE node needs to run, log and pull images: the predefined
# least-privilege node role, plus reading images from Artifact Registry.
NODE_ROLES = (
    "roles/container.defaultNodeServiceAccount",
    "roles/artifactregistry.reader",
)

# Nodes get the cloud-platform scope and are limited by IAM roles instead:
# Google's recommendation for a dedicated node service account.
NODE_OAUTH_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)

AUTH_PLUGIN = "gke-gcloud-auth-plugin"


def network(name: str, opts: pulumi.ResourceOptions) -> gcp.compute.Network:
    return gcp.compute.Network(
        name,
        auto_create_subnetworks=False,
        description="VPC for the Celery worker cluster",
        opts=opts,
    )


def subnetwork(
    name: str, gke: GkeConfig, vpc: gcp.compute.Network, opts: pulumi.ResourceOptions
) -> gcp.compute.Subnetwork:
    # VPC-native: pods and services get their own secondary ranges.
    return gcp.compute.Subnetwork(
        name,
        network=vpc.id,
        region=gke.region,
        ip_cidr_range=gke.subnet_cidr,
        private_ip_google_access=True,
        secondary_ip_ranges=[
            gcp.compute.SubnetworkSecondaryIpRangeArgs(
                range_name="pods", ip_cidr_range=gke.pods_cidr
            ),
            gcp.compute.SubnetworkSecondaryIpRangeArgs(
                range_name="services", ip_cidr_range=gke.services_cidr
            ),
        ],
        opts=opts,
    )


def node_service_account(name: str, opts: pulumi.ResourceOptions) -> gcp.serviceaccount.Account:
    return gcp.serviceaccount.Account(
        name,
        account_id=name[:30],
        display_name="GKE nodes of the Celery worker cluster",
        opts=opts,
    )


def node_role_bindings(
    name: str, project: str, account: gcp.serviceaccount.Account, opts: pulumi.ResourceOptions
) -> list[gcp.projects.IAMMember]:
    return [
        gcp.projects.IAMMember(
            f"{name}-{role.split('/')[-1]}",
            project=project,
            role=role,
            member=account.email.apply(lambda email: f"serviceAccount:{email}"),
            opts=opts,
        )
        for role in NODE_ROLES
    ]


def cluster(
    name: str,
    config: StackConfig,
    vpc: gcp.compute.Network,
    subnet: gcp.compute.Subnetwork,
    account: gcp.serviceaccount.Account,
    opts: pulumi.ResourceOptions,
) -> gcp.container.Cluster:
    gke = config.gke
    return gcp.container.Cluster(
        name,
        project=config.gcp_project,
        location=gke.location,
        network=vpc.id,
        subnetwork=subnet.id,
        networking_mode="VPC_NATIVE",
        ip_allocation_policy=gcp.container.ClusterIpAllocationPolicyArgs(
            cluster_secondary_range_name="pods",
            services_secondary_range_name="services",
        ),
        # The default pool cannot be changed without replacing the cluster:
        # start it with one node and delete it; `NodePool` below is the real one.
        remove_default_node_pool=True,
        initial_node_count=1,
        # Even the short-lived default pool must not run as the default compute account.
        node_config=gcp.container.ClusterNodeConfigArgs(
            service_account=account.email,
            oauth_scopes=list(NODE_OAUTH_SCOPES),
            shielded_instance_config=gcp.container.ClusterNodeConfigShieldedInstanceConfigArgs(
                enable_secure_boot=True, enable_integrity_monitoring=True
            ),
        ),
        min_master_version=config.kubernetes.version,
        release_channel=gcp.container.ClusterReleaseChannelArgs(channel=gke.release_channel),
        workload_identity_config=gcp.container.ClusterWorkloadIdentityConfigArgs(
            workload_pool=f"{config.gcp_project}.svc.id.goog"
        ),
        enable_shielded_nodes=True,
        # Dataplane V2 enforces the NetworkPolicies the RabbitMQ component ships.
        datapath_provider="ADVANCED_DATAPATH",
        addons_config=gcp.container.ClusterAddonsConfigArgs(
            gce_persistent_disk_csi_driver_config=gcp.container.ClusterAddonsConfigGcePersistentDiskCsiDriverConfigArgs(
                enabled=True
            ),
        ),
        # pulumi-gcp defaults this to True, which makes `pulumi destroy` fail:
        # it comes from the stack (off in dev, on in prod).
        deletion_protection=gke.deletion_protection,
        opts=opts,
    )


def node_pool(
    name: str,
    config: StackConfig,
    gke_cluster: gcp.container.Cluster,
    account: gcp.serviceaccount.Account,
    opts: pulumi.ResourceOptions,
) -> gcp.container.NodePool:
    gke = config.gke
    return gcp.container.NodePool(
        name,
        project=config.gcp_project,
        cluster=gke_cluster.name,
        location=gke.location,
        # Per zone: 3 in a zonal cluster, 1 in each of a region's 3 zones.
        node_count=gke.nodes_per_zone,
        management=gcp.container.NodePoolManagementArgs(auto_repair=True, auto_upgrade=True),
        node_config=gcp.container.NodePoolNodeConfigArgs(
            machine_type=gke.machine_type,
            spot=gke.spot,
            disk_type=gke.disk_type,
            disk_size_gb=gke.disk_size_gb,
            service_account=account.email,
            oauth_scopes=list(NODE_OAUTH_SCOPES),
            shielded_instance_config=gcp.container.NodePoolNodeConfigShieldedInstanceConfigArgs(
                enable_secure_boot=True, enable_integrity_monitoring=True
            ),
            workload_metadata_config=gcp.container.NodePoolNodeConfigWorkloadMetadataConfigArgs(
                mode="GKE_METADATA"
            ),
            labels={"stack": config.stack},
        ),
        opts=opts,
    )


def kubeconfig(gke_cluster: gcp.container.Cluster, config: StackConfig) -> pulumi.Output[str]:
    """A kubeconfig that authenticates through gke-gcloud-auth-plugin (no static token)."""

    def render(args: list[str]) -> str:
        cluster_name, endpoint, ca = args
        context = f"gke_{config.gcp_project}_{config.gke.location}_{cluster_name}"
        return "\n".join(
            [
                "apiVersion: v1",
                "kind: Config",
                "clusters:",
                "- cluster:",
                f"    certificate-authority-data: {ca}",
                f"    server: https://{endpoint}",
                f"  name: {context}",
                "contexts:",
                "- context:",
                f"    cluster: {context}",
                f"    user: {context}",
                f"  name: {context}",
                f"current-context: {context}",
                "preferences: {}",
                "users:",
                f"- name: {context}",
                "  user:",
                "    exec:",
                "      apiVersion: client.authentication.k8s.io/v1beta1",
                f"      command: {AUTH_PLUGIN}",
                "      installHint: Install gke-gcloud-auth-plugin for kubectl by following",
                "        https://cloud.google.com/kubernetes-engine/docs/how-to/cluster-access-for-kubectl#install_plugin",
                "      provideClusterInfo: true",
                "",
            ]
        )

    text = pulumi.Output.all(
        gke_cluster.name,
        gke_cluster.endpoint,
        gke_cluster.master_auth.cluster_ca_certificate,
    ).apply(render)
    return pulumi.Output.secret(text)


class GkeCluster(pulumi.ComponentResource):
    """A VPC-native GKE cluster with a dedicated node pool and a Kubernetes provider."""

    cluster_name: pulumi.Output[str]
    endpoint: pulumi.Output[str]
    kubeconfig: pulumi.Output[str]
    provider: k8s.Provider

    def __init__(
        self, name: str, config: StackConfig, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("celerycluster:gke:GkeCluster", name, {}, opts)
        child = pulumi.ResourceOptions(parent=self)
        # What takes long to rebuild (and holds the data volumes) is protected in prod.
        durable = pulumi.ResourceOptions(parent=self, protect=config.protect)

        vpc = network(f"{name}-vpc", child)
        subnet = subnetwork(f"{name}-subnet", config.gke, vpc, child)
        account = node_service_account(f"{name}-nodes", child)
        bindings = node_role_bindings(f"{name}-nodes", config.gcp_project, account, child)
        gke_cluster = cluster(name, config, vpc, subnet, account, durable)
        pool = node_pool(
            f"{name}-pool",
            config,
            gke_cluster,
            account,
            pulumi.ResourceOptions.merge(durable, pulumi.ResourceOptions(depends_on=bindings)),
        )

        self.cluster_name = gke_cluster.name
        self.endpoint = gke_cluster.endpoint
        self.kubeconfig = kubeconfig(gke_cluster, config)
        # Workloads wait for the node pool, not just the control plane.
        self.provider = k8s.Provider(
            f"{name}-k8s",
            kubeconfig=self.kubeconfig,
            enable_server_side_apply=True,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[pool]),
        )
        self.register_outputs(
            {
                "cluster_name": self.cluster_name,
                "endpoint": self.endpoint,
                "kubeconfig": self.kubeconfig,
            }
        )


def existing_cluster_provider(config: StackConfig) -> k8s.Provider:
    """Target "existing": deploy onto a kubeconfig context (minikube, kind, any cluster)."""
    return k8s.Provider(
        "existing-cluster",
        context=config.kubernetes.context or None,
        enable_server_side_apply=True,
    )
