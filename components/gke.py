"""The GKE cluster: network, node service account, cluster, node pools, provider.

One small function per GCP object; `GkeCluster` assembles them. The cluster's
default node pool is removed and replaced by a separately managed pool, so a
node-pool change (machine type, spot) never forces the cluster itself to be
replaced.

Every ID set explicitly (the node service account's, the Artifact Registry
repository's in worker_image.py) carries the stack name: dev and prod may share
one GCP project. The other GCP objects are auto-named by Pulumi (a random suffix).
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_gcp as gcp
import pulumi_kubernetes as k8s

from components.config import GkeConfig, StackConfig
from components.gcp_ids import stack_id, stack_label
from components.names import POOL_LABEL, RABBITMQ_POOL, WORKER_POOL

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

# GCP service account IDs: 6-30 characters, [a-z][-a-z0-9]{4,28}[a-z0-9].
SERVICE_ACCOUNT_ID_MAX = 30


@dataclass(frozen=True)
class GkeClusterArgs:
    """What `GkeCluster` needs from the stack configuration, and nothing else."""

    project: str
    stack: str
    gke: GkeConfig
    # Pulumi `protect` on the cluster and its node pool.
    protect: bool
    # GKE Managed Prometheus collection (monitoring.managedPrometheus).
    managed_prometheus: bool = True
    # The main pool is RabbitMQ's alone and workers get their own autoscaled pool.
    dedicated_pools: bool = False

    @classmethod
    def from_stack(cls, config: StackConfig) -> GkeClusterArgs:
        return cls(
            project=config.gcp_project,
            stack=config.stack,
            gke=config.gke,
            protect=config.protect,
            managed_prometheus=config.monitoring.managed_prometheus,
            dedicated_pools=config.dedicated_pools,
        )


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


def node_service_account(
    name: str, args: GkeClusterArgs, opts: pulumi.ResourceOptions
) -> gcp.serviceaccount.Account:
    return gcp.serviceaccount.Account(
        name,
        project=args.project,
        account_id=stack_id(name, args.stack, SERVICE_ACCOUNT_ID_MAX),
        display_name=f"GKE nodes of the Celery worker cluster ({args.stack})",
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


def control_plane_endpoints(gke: GkeConfig) -> gcp.container.ClusterControlPlaneEndpointsConfigArgs:
    """One way in: the DNS endpoint (IAM decides who connects) or the IP endpoint."""
    dns = gke.control_plane == "dns"
    return gcp.container.ClusterControlPlaneEndpointsConfigArgs(
        dns_endpoint_config=gcp.container.ClusterControlPlaneEndpointsConfigDnsEndpointConfigArgs(
            allow_external_traffic=dns
        ),
        ip_endpoints_config=gcp.container.ClusterControlPlaneEndpointsConfigIpEndpointsConfigArgs(
            enabled=not dns
        ),
    )


def master_authorized_networks(
    gke: GkeConfig,
) -> gcp.container.ClusterMasterAuthorizedNetworksConfigArgs | None:
    # Only with the IP endpoint: sending this block with "dns" turns IP access back on.
    if gke.control_plane != "ip":
        return None
    return gcp.container.ClusterMasterAuthorizedNetworksConfigArgs(
        cidr_blocks=[
            gcp.container.ClusterMasterAuthorizedNetworksConfigCidrBlockArgs(
                cidr_block=cidr, display_name=f"authorized-{i}"
            )
            for i, cidr in enumerate(gke.authorized_networks)
        ],
        # Any Compute Engine VM's public IP (anyone's) is not an authorized network.
        gcp_public_cidrs_access_enabled=False,
    )


def cluster(
    name: str,
    args: GkeClusterArgs,
    vpc: gcp.compute.Network,
    subnet: gcp.compute.Subnetwork,
    account: gcp.serviceaccount.Account,
    opts: pulumi.ResourceOptions,
) -> gcp.container.Cluster:
    gke = args.gke
    return gcp.container.Cluster(
        name,
        project=args.project,
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
        # Even the short-lived default pool must not run as the default compute
        # account, so this stays; once the pool is gone GKE reports another pool's
        # config here, which is why the cluster ignores changes to it (see GkeCluster).
        node_config=gcp.container.ClusterNodeConfigArgs(
            service_account=account.email,
            oauth_scopes=list(NODE_OAUTH_SCOPES),
            shielded_instance_config=gcp.container.ClusterNodeConfigShieldedInstanceConfigArgs(
                enable_secure_boot=True, enable_integrity_monitoring=True
            ),
        ),
        # None (the default) sends nothing: the release channel picks a version it offers.
        min_master_version=gke.min_master_version,
        release_channel=gcp.container.ClusterReleaseChannelArgs(channel=gke.release_channel),
        control_plane_endpoints_config=control_plane_endpoints(gke),
        master_authorized_networks_config=master_authorized_networks(gke),
        workload_identity_config=gcp.container.ClusterWorkloadIdentityConfigArgs(
            workload_pool=f"{args.project}.svc.id.goog"
        ),
        enable_shielded_nodes=True,
        # Dataplane V2 enforces the NetworkPolicies the RabbitMQ component ships.
        datapath_provider="ADVANCED_DATAPATH",
        # Managed collection scrapes what components/monitoring.py's PodMonitorings
        # select and evaluates its Rules; system components' metrics come with it.
        monitoring_config=gcp.container.ClusterMonitoringConfigArgs(
            enable_components=["SYSTEM_COMPONENTS"],
            managed_prometheus=gcp.container.ClusterMonitoringConfigManagedPrometheusArgs(
                enabled=args.managed_prometheus
            ),
        ),
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


def _node_config(
    args: GkeClusterArgs,
    account: gcp.serviceaccount.Account,
    *,
    machine_type: str,
    spot: bool,
    pool: str | None,
) -> gcp.container.NodePoolNodeConfigArgs:
    labels = {"stack": stack_label(args.stack)}
    taints = None
    if pool is not None:
        labels[POOL_LABEL] = pool
    if pool == RABBITMQ_POOL:
        # Only the RabbitMQ StatefulSet tolerates it: a burst of anything else lands
        # on the workers' pool, never on a broker's node.
        taints = [
            gcp.container.NodePoolNodeConfigTaintArgs(
                key=POOL_LABEL, value=RABBITMQ_POOL, effect="NO_SCHEDULE"
            )
        ]
    return gcp.container.NodePoolNodeConfigArgs(
        machine_type=machine_type,
        spot=spot,
        disk_type=args.gke.disk_type,
        disk_size_gb=args.gke.disk_size_gb,
        service_account=account.email,
        oauth_scopes=list(NODE_OAUTH_SCOPES),
        shielded_instance_config=gcp.container.NodePoolNodeConfigShieldedInstanceConfigArgs(
            enable_secure_boot=True, enable_integrity_monitoring=True
        ),
        workload_metadata_config=gcp.container.NodePoolNodeConfigWorkloadMetadataConfigArgs(
            mode="GKE_METADATA"
        ),
        labels=labels,
        taints=taints,
    )


def node_pool(
    name: str,
    args: GkeClusterArgs,
    gke_cluster: gcp.container.Cluster,
    account: gcp.serviceaccount.Account,
    opts: pulumi.ResourceOptions,
) -> gcp.container.NodePool:
    """The fixed pool: RabbitMQ's alone with dedicated pools, everything's otherwise."""
    gke = args.gke
    return gcp.container.NodePool(
        name,
        project=args.project,
        cluster=gke_cluster.name,
        location=gke.location,
        # Per zone: 3 in a zonal cluster, 1 in each of a region's 3 zones. Never
        # autoscaled: RabbitMQ's anti-affinity wants exactly one node per pod.
        node_count=gke.nodes_per_zone,
        management=gcp.container.NodePoolManagementArgs(auto_repair=True, auto_upgrade=True),
        node_config=_node_config(
            args,
            account,
            machine_type=gke.machine_type,
            spot=gke.spot,
            pool=RABBITMQ_POOL if args.dedicated_pools else None,
        ),
        opts=opts,
    )


def worker_node_pool(
    name: str,
    args: GkeClusterArgs,
    gke_cluster: gcp.container.Cluster,
    account: gcp.serviceaccount.Account,
    opts: pulumi.ResourceOptions,
) -> gcp.container.NodePool:
    """The workers' pool: the cluster autoscaler adds a node when KEDA's new worker
    pods do not fit, and removes one its pods no longer need (evicted within their
    PodDisruptionBudget and grace period: a warm shutdown, late acks)."""
    pool = args.gke.worker_pool
    return gcp.container.NodePool(
        name,
        project=args.project,
        cluster=gke_cluster.name,
        location=args.gke.location,
        # The autoscaler owns the count after creation.
        initial_node_count=pool.min_nodes_per_zone,
        autoscaling=gcp.container.NodePoolAutoscalingArgs(
            min_node_count=pool.min_nodes_per_zone,
            max_node_count=pool.max_nodes_per_zone,
            # Spot capacity comes from whichever zone has it; on-demand stays even.
            location_policy="ANY" if pool.spot else "BALANCED",
        ),
        management=gcp.container.NodePoolManagementArgs(auto_repair=True, auto_upgrade=True),
        node_config=_node_config(
            args, account, machine_type=pool.machine_type, spot=pool.spot, pool=WORKER_POOL
        ),
        opts=opts,
    )


def control_plane_endpoint(
    gke_cluster: gcp.container.Cluster, gke: GkeConfig
) -> pulumi.Output[str]:
    """The host clients reach the control plane at: its DNS name, or its IP address."""
    if gke.control_plane == "dns":
        return gke_cluster.control_plane_endpoints_config.apply(_dns_endpoint)
    return gke_cluster.endpoint


def _dns_endpoint(
    endpoints: gcp.container.outputs.ClusterControlPlaneEndpointsConfig | None,
) -> str:
    dns = endpoints.dns_endpoint_config if endpoints else None
    if dns is None or not dns.endpoint:
        raise ValueError("GKE reported no DNS endpoint for a cluster with controlPlane 'dns'")
    return dns.endpoint


def kubeconfig(
    gke_cluster: gcp.container.Cluster, endpoint: pulumi.Output[str], args: GkeClusterArgs
) -> pulumi.Output[str]:
    """A kubeconfig that authenticates through gke-gcloud-auth-plugin (no static token).

    The DNS endpoint presents a publicly trusted certificate, not one signed by the
    cluster CA, so the CA is pinned only for the IP endpoint.
    """
    pin_ca = args.gke.control_plane == "ip"

    def render(values: list[str]) -> str:
        cluster_name, server, ca = values
        context = f"gke_{args.project}_{args.gke.location}_{cluster_name}"
        ca_line = [f"    certificate-authority-data: {ca}"] if pin_ca else []
        return "\n".join(
            [
                "apiVersion: v1",
                "kind: Config",
                "clusters:",
                "- cluster:",
                *ca_line,
                f"    server: https://{server}",
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
        endpoint,
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
        self, name: str, args: GkeClusterArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("celerycluster:gke:GkeCluster", name, {}, opts)
        child = pulumi.ResourceOptions(parent=self)
        # What takes long to rebuild (and holds the data volumes) is protected in prod.
        durable = pulumi.ResourceOptions(parent=self, protect=args.protect)

        vpc = network(f"{name}-vpc", child)
        subnet = subnetwork(f"{name}-subnet", args.gke, vpc, child)
        account = node_service_account(f"{name}-nodes", args, child)
        bindings = node_role_bindings(f"{name}-nodes", args.project, account, child)
        gke_cluster = cluster(
            name,
            args,
            vpc,
            subnet,
            account,
            pulumi.ResourceOptions.merge(
                durable,
                pulumi.ResourceOptions(
                    # The default pool's nodes start as `account`: its roles first.
                    depends_on=bindings,
                    # With the default pool removed, GKE reports the remaining pool's
                    # node config as the cluster's; the diff would force a replacement
                    # of the cluster. Set here: ignore_changes is not inherited.
                    ignore_changes=["nodeConfig"],
                ),
            ),
        )
        pools = [
            node_pool(
                f"{name}-pool",
                args,
                gke_cluster,
                account,
                pulumi.ResourceOptions.merge(durable, pulumi.ResourceOptions(depends_on=bindings)),
            )
        ]
        if args.dedicated_pools:
            pools.append(
                worker_node_pool(
                    f"{name}-worker-pool",
                    args,
                    gke_cluster,
                    account,
                    pulumi.ResourceOptions.merge(
                        child, pulumi.ResourceOptions(depends_on=bindings)
                    ),
                )
            )

        self.cluster_name = gke_cluster.name
        self.endpoint = control_plane_endpoint(gke_cluster, args.gke)
        self.kubeconfig = kubeconfig(gke_cluster, self.endpoint, args)
        # Workloads wait for the node pools, not just the control plane.
        self.provider = k8s.Provider(
            f"{name}-k8s",
            kubeconfig=self.kubeconfig,
            enable_server_side_apply=True,
            opts=pulumi.ResourceOptions(parent=self, depends_on=pools),
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
