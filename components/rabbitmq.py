"""A 3-node RabbitMQ cluster as a StatefulSet, the way the Cluster Operator builds it.

Like the Operator's ``internal/resource/`` builders: ONE small pure function per
Kubernetes object, returning the manifest as a plain camelCase dict
(``apiVersion``, ``kind``, ``metadata``, ``spec``/``data``...), each unit-testable on
its own; :class:`RabbitmqCluster` registers them with the typed pulumi_kubernetes
classes. Every line of RabbitMQ configuration comes from
:mod:`components.rabbitmq_conf` (the one renderer, also booted by the local
integration tests); nothing here writes ``rabbitmq.conf`` text.

What replaces the article's chart, and why:

* The official image, pinned: no custom image, no ``cmd.sh`` join script. The
  ``rabbitmq_peer_discovery_k8s`` plugin forms the cluster on first boot. Caveat:
  from 4.1 the plugin makes pod ``-0`` the seed, and pod 0 that lost its volume
  boots as the seed of a NEW cluster on 4.1-4.2 (the article's weak point, moved);
  peer discovery runs only on a blank node, so the other pods keep their cluster.
* ``podManagementPolicy: Parallel``: with OrderedReady a full restart can deadlock
  (a node waits for peers to boot, the peers wait for it to be Ready).
* Long node names ``rabbit@<pod>.<headless>.<namespace>`` from the downward API, a
  headless Service publishing not-ready addresses (peers must resolve each other
  before they are Ready) with ports 4369 (epmd) and 25672 (Erlang distribution,
  which the article mislabelled "management-ssl").
* Quorum queues instead of ``ha-all`` mirroring (removed in 4.0): the definitions
  add a ``delivery-limit`` and a dead-letter target.
* Random Erlang cookie and application user in a Secret, never ``changeThis`` or
  ``guest``; the management UI is only reachable with ``kubectl port-forward``
  (the client Service is ClusterIP, there is no LoadBalancer or Ingress).
* Required pod anti-affinity in production, zone spread, a PodDisruptionBudget,
  a preStop hook that keeps quorum queues available during voluntary restarts,
  volumes on the GCE PD CSI driver (kept after the StatefulSet in production).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pulumi
import pulumi_kubernetes as k8s
import pulumi_random as random

from components import kube, names
from components.config import MANAGED_STORAGE_TYPES, RabbitmqConfig, StackConfig
from components.gcp_ids import stack_id, stack_label
from components.names import RABBITMQ_POOL, pool_placement
from components.rabbitmq_conf import (
    KubernetesDiscovery,
    default_user_conf,
    definitions_json,
    enabled_plugins,
    needs_kubernetes_api,
    rabbitmq_conf,
)


@dataclass(frozen=True)
class RabbitmqClusterArgs:
    """What the RabbitMQ component needs from the stack (Pulumi's ``*Args`` convention)."""

    stack: str
    rabbitmq: RabbitmqConfig
    production: bool
    # The namespace whose pods labelled as AMQP clients may connect (the workers').
    client_namespace: str
    # The namespace of KEDA, which reads the queue's depth from the management API
    # as MONITOR_USERNAME; None: no autoscaling, no such user.
    monitor_namespace: str | None = None
    # On the tainted node pool of its own (gke.workerPool on).
    dedicated_pool: bool = False

    @classmethod
    def from_stack(cls, config: StackConfig) -> RabbitmqClusterArgs:
        return cls(
            stack=config.stack,
            rabbitmq=config.rabbitmq,
            production=config.production,
            client_namespace=config.workers.namespace,
            monitor_namespace=config.autoscaling.keda_namespace if config.autoscaled else None,
            dedicated_pool=config.dedicated_pools,
        )

    @property
    def protect(self) -> bool:
        """Pulumi ``protect`` on what holds the messages (production)."""
        return self.production


# --- names shared by the objects below (and by the workers' broker URLs) ------

STATEFULSET = "rabbitmq-server"
HEADLESS_SERVICE = "rabbitmq-nodes"
CLIENT_SERVICE = "rabbitmq"
CONFIG_MAP = "rabbitmq-config"
SECRET = "rabbitmq-credentials"
SERVICE_ACCOUNT = "rabbitmq-server"
ROLE = "rabbitmq-peer-discovery"
PDB = "rabbitmq-server"
NETWORK_POLICY = "rabbitmq-server"
COMPONENT = "broker"
DNS_LABEL_MAX = 63
CLUSTER_DOMAIN = "cluster.local"

# The application user (the workers') and its vhost. There is no guest user.
APP_USERNAME = "celery"
VHOST = "celery"
# KEDA's: reads queue statistics through the management API, nothing else.
MONITOR_USERNAME = "keda-scaler"

AMQP_PORT = 5672
MANAGEMENT_PORT = 15672
PROMETHEUS_PORT = 15692
EPMD_PORT = 4369
DIST_PORT = 25672  # Erlang distribution: inter-node and CLI traffic
# CLI tools run a short-lived Erlang node whose distribution port is taken from
# this range (25672 + 10000 ... + 10010).
CLI_DIST_PORTS = tuple(range(35672, 35683))

# Official image layout: user rabbitmq is uid/gid 999, HOME is /var/lib/rabbitmq
# (where the node and the CLI tools read .erlang.cookie), data below mnesia/.
# The data directory keeps its historical name on 4.3 (Khepri) too.
RABBITMQ_UID = 999
HOME_DIR = "/var/lib/rabbitmq"
DATA_DIR = f"{HOME_DIR}/mnesia"
COOKIE_FILE = f"{HOME_DIR}/.erlang.cookie"
COOKIE_SECRET_DIR = "/run/rabbitmq-cookie"
DEFINITIONS_FILE = "/etc/rabbitmq/definitions.json"
POD_INFO_DIR = "/etc/pod-info"

# Secret keys.
COOKIE_KEY = ".erlang.cookie"
USERNAME_KEY = "username"
PASSWORD_KEY = "password"
VHOST_KEY = "vhost"
DEFAULT_USER_CONF_KEY = "default_user.conf"
# Topology AND the application user (with its password hash): a Secret.
DEFINITIONS_KEY = "definitions.json"
# ConfigMap keys.
CONF_KEY = "rabbitmq.conf"
PLUGINS_KEY = "enabled_plugins"

# The Operator's escape hatch: `kubectl label pod <pod> skipPreStopChecks=true`
# makes the preStop hook return at once (e.g. when the whole cluster is being
# deleted and no quorum can ever be reached again).
SKIP_PRESTOP_LABEL = "skipPreStopChecks"
CONFIG_HASH_ANNOTATION = "celery-cluster/config-hash"

# How long a node may take to finish booting before the startup probe gives up
# and restarts it. Generous on purpose: after a full stop a node waits for its
# peers (Mnesia: 10 x 30 s by default), and a restart would only start the wait
# again. With Parallel pod management all peers are starting at the same time.
STARTUP_BUDGET_SECONDS = 15 * 60
STARTUP_PERIOD_SECONDS = 10

# --- small helpers ----------------------------------------------------------------


def labels() -> dict[str, str]:
    return names.app_labels(names.RABBITMQ_APP, COMPONENT)


def selector() -> dict[str, str]:
    return names.selector_labels(names.RABBITMQ_APP)


def _metadata(name: str, namespace: str | None = None) -> dict[str, Any]:
    return kube.metadata(name, labels(), namespace)


def discovery(args: RabbitmqClusterArgs) -> KubernetesDiscovery:
    rmq = args.rabbitmq
    return KubernetesDiscovery(HEADLESS_SERVICE, rmq.namespace, rmq.replicas)


def pod_fqdn(args: RabbitmqClusterArgs, ordinal: int) -> str:
    ns = args.rabbitmq.namespace
    return f"{STATEFULSET}-{ordinal}.{HEADLESS_SERVICE}.{ns}.svc.{CLUSTER_DOMAIN}"


def broker_urls(args: RabbitmqClusterArgs, username: str, password: str) -> list[str]:
    """One amqp URL per pod DNS name: the failover list the workers use.

    Pod names resolve through the headless Service from any namespace (the
    workers' too), even before the pod is Ready.
    """
    user, secret, vhost = quote(username, safe=""), quote(password, safe=""), quote(VHOST, safe="")
    return [
        f"amqp://{user}:{secret}@{pod_fqdn(args, i)}:{AMQP_PORT}/{vhost}"
        for i in range(args.rabbitmq.replicas)
    ]


def storage_class_name(args: RabbitmqClusterArgs) -> str:
    """pd-ssd / pd-balanced: a class this component creates; anything else exists already.

    A StorageClass is cluster-scoped: the stack is in its name, so two stacks
    deployed onto one cluster never fight over it.
    """
    storage = args.rabbitmq.storage_class
    if storage not in MANAGED_STORAGE_TYPES:
        return storage
    return stack_id(f"rabbitmq-{storage}", args.stack, DNS_LABEL_MAX)


def manages_storage_class(args: RabbitmqClusterArgs) -> bool:
    return args.rabbitmq.storage_class in MANAGED_STORAGE_TYPES


def prestop_timeouts(grace_seconds: int) -> tuple[int, int]:
    """(await_online_quorum_plus_one, drain) timeouts inside the grace period.

    Whatever is left after both is the time RabbitMQ gets to stop cleanly on
    SIGTERM before the kubelet's SIGKILL.
    """
    stop_reserve = min(60, grace_seconds // 4)
    drain = min(120, (grace_seconds - stop_reserve) // 3)
    return grace_seconds - stop_reserve - drain, drain


# --- one builder per Kubernetes object ------------------------------------------------


def namespace(args: RabbitmqClusterArgs) -> dict[str, Any]:
    meta = _metadata(args.rabbitmq.namespace)
    # Every pod here meets the "restricted" Pod Security Standard; enforce it.
    meta["labels"] = {
        **meta["labels"],
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    }
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def storage_class(args: RabbitmqClusterArgs) -> dict[str, Any]:
    """A GCE PD CSI class of the configured disk type (pd-ssd or pd-balanced)."""
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": _metadata(storage_class_name(args)),
        "provisioner": "pd.csi.storage.gke.io",
        "parameters": {
            "type": args.rabbitmq.storage_class,
            # On every disk it creates: deleting a GKE cluster leaves its disks (and
            # the bill); `make destroy` lists what carries this stack's label.
            "labels": f"{names.STACK_LABEL}={stack_label(args.stack)}",
        },
        # The disk is created in the zone the pod is scheduled to.
        "volumeBindingMode": "WaitForFirstConsumer",
        "allowVolumeExpansion": True,
        # Production: a deleted PVC leaves its disk (and the messages) behind.
        "reclaimPolicy": "Retain" if args.production else "Delete",
    }


def secret_string_data(
    args: RabbitmqClusterArgs,
    *,
    erlang_cookie: str,
    password: str,
    monitor_password: str | None = None,
) -> dict[str, str]:
    """The Secret's contents, from the generated cookie and passwords."""
    return {
        COOKIE_KEY: erlang_cookie,
        USERNAME_KEY: APP_USERNAME,
        PASSWORD_KEY: password,
        VHOST_KEY: VHOST,
        DEFAULT_USER_CONF_KEY: default_user_conf(APP_USERNAME, password, VHOST),
        # The same document the local cluster boots. RabbitMQ does NOT seed
        # default_user when definitions are imported at boot ("have definitions
        # to load"), so the user is in here, as a salted hash.
        DEFINITIONS_KEY: definitions_json(
            VHOST,
            delivery_limit=args.rabbitmq.delivery_limit,
            username=APP_USERNAME,
            password=password,
            version=args.rabbitmq.version,
            monitor=(MONITOR_USERNAME, monitor_password) if monitor_password else None,
        ),
        # Comma-separated, as CELERY_BROKER_URLS expects.
        names.BROKER_URLS_KEY: ",".join(broker_urls(args, APP_USERNAME, password)),
    }


def secret_data(string_data: Mapping[str, str]) -> dict[str, str]:
    """Base64 ``data``: ``stringData`` is not tracked by server-side apply (a key
    removed from it would linger in the live object), ``data`` is."""
    return {k: base64.b64encode(v.encode()).decode() for k, v in string_data.items()}


def secret(args: RabbitmqClusterArgs, data: pulumi.Input[Mapping[str, str]]) -> dict[str, Any]:
    """Erlang cookie and application credentials (``data`` is a secret Output)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(SECRET, args.rabbitmq.namespace),
        "type": "Opaque",
        "data": data,
    }


def config_map_data(args: RabbitmqClusterArgs) -> dict[str, str]:
    rmq = args.rabbitmq
    found = discovery(args)
    return {
        CONF_KEY: rabbitmq_conf(
            rmq.version,
            found,
            disk_free_limit=rmq.disk_free_limit_bytes(args.production),
            container_memory_limit=rmq.memory_limit_bytes,
            definitions_path=DEFINITIONS_FILE,
            net_ticktime=rmq.net_ticktime_seconds,
        ),
        PLUGINS_KEY: enabled_plugins(found),
    }


def config_map(args: RabbitmqClusterArgs) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(CONFIG_MAP, args.rabbitmq.namespace),
        "data": config_map_data(args),
    }


def service_account(args: RabbitmqClusterArgs) -> dict[str, Any]:
    # Its own account, never the namespace's default; a token only where the
    # peer-discovery plugin calls the API (before 4.1).
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(SERVICE_ACCOUNT, args.rabbitmq.namespace),
        "automountServiceAccountToken": needs_kubernetes_api(args.rabbitmq.version),
    }


def role(args: RabbitmqClusterArgs) -> dict[str, Any]:
    """What rabbitmq_peer_discovery_k8s needs before 4.1 (registered only then)."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(ROLE, args.rabbitmq.namespace),
        "rules": [
            # The plugin GETs the Endpoints of the headless Service, nothing else.
            {
                "apiGroups": [""],
                "resources": ["endpoints"],
                "resourceNames": [HEADLESS_SERVICE],
                "verbs": ["get"],
            },
            {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
        ],
    }


def role_binding(args: RabbitmqClusterArgs) -> dict[str, Any]:
    ns = args.rabbitmq.namespace
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(ROLE, ns),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": ROLE},
        "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": ns}],
    }


def headless_service(args: RabbitmqClusterArgs) -> dict[str, Any]:
    """Stable DNS for every pod: rabbitmq-server-N.<headless>.<ns>.svc."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(HEADLESS_SERVICE, args.rabbitmq.namespace),
        "spec": {
            "clusterIP": "None",
            # Peers must resolve each other while booting, i.e. before Ready.
            "publishNotReadyAddresses": True,
            "selector": selector(),
            "ports": [
                {"name": "epmd", "port": EPMD_PORT, "targetPort": EPMD_PORT, "protocol": "TCP"},
                {
                    "name": "cluster-links",
                    "port": DIST_PORT,
                    "targetPort": DIST_PORT,
                    "protocol": "TCP",
                },
            ],
        },
    }


def client_service(args: RabbitmqClusterArgs) -> dict[str, Any]:
    """In-cluster only (ClusterIP): the UI is reached with `kubectl port-forward`."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(CLIENT_SERVICE, args.rabbitmq.namespace),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(),
            "ports": [
                {
                    "name": "amqp",
                    "port": AMQP_PORT,
                    "targetPort": "amqp",
                    "protocol": "TCP",
                    "appProtocol": "amqp",
                },
                {
                    "name": "management",
                    "port": MANAGEMENT_PORT,
                    "targetPort": "management",
                    "protocol": "TCP",
                    "appProtocol": "http",
                },
                {
                    "name": "prometheus",
                    "port": PROMETHEUS_PORT,
                    "targetPort": "prometheus",
                    "protocol": "TCP",
                    "appProtocol": "prometheus.io/metrics",
                },
            ],
        },
    }


def _anti_affinity(args: RabbitmqClusterArgs) -> dict[str, Any]:
    term = {"labelSelector": {"matchLabels": selector()}, "topologyKey": "kubernetes.io/hostname"}
    if args.rabbitmq.anti_affinity == "required":
        # Never two nodes of the cluster on one machine: losing a VM loses one node.
        return {"requiredDuringSchedulingIgnoredDuringExecution": [term]}
    return {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 100, "podAffinityTerm": term}
        ]
    }


def _setup_container(args: RabbitmqClusterArgs) -> dict[str, Any]:
    """Copies the cookie from the Secret to $HOME with mode 600, as uid 999.

    Erlang refuses a cookie file readable by group or others, and a Secret volume
    cannot provide one: with fsGroup the kubelet adds group read (0440). So the
    file is copied into an emptyDir, owned by the rabbitmq user (no root, no
    CHOWN capability needed). RABBITMQ_ERLANG_COOKIE is deprecated.
    """
    return {
        "name": "setup-erlang-cookie",
        "image": args.rabbitmq.image,
        "imagePullPolicy": "IfNotPresent",
        "command": [
            "/bin/sh",
            "-c",
            f"umask 077 && cp {COOKIE_SECRET_DIR}/{COOKIE_KEY} {COOKIE_FILE}"
            f" && chmod 600 {COOKIE_FILE}",
        ],
        "resources": {
            "requests": {"cpu": "10m", "memory": "32Mi"},
            "limits": {"cpu": "100m", "memory": "64Mi"},
        },
        "securityContext": kube.container_security_context(),
        "volumeMounts": [
            {"name": "erlang-cookie-secret", "mountPath": COOKIE_SECRET_DIR, "readOnly": True},
            {"name": "rabbitmq-home", "mountPath": HOME_DIR},
        ],
    }


def _prestop_command(args: RabbitmqClusterArgs) -> list[str]:
    await_seconds, drain_seconds = prestop_timeouts(args.rabbitmq.termination_grace_seconds)
    script = (
        f'if [ -n "$(cat {POD_INFO_DIR}/{SKIP_PRESTOP_LABEL} 2>/dev/null)" ]; then exit 0; fi; '
        # Wait until every quorum queue keeps a majority without this node...
        f"rabbitmq-upgrade await_online_quorum_plus_one -t {await_seconds}; "
        # ...then close client connections (workers fail over to the next URL)
        # and hand quorum-queue leadership to the peers. A successful boot takes
        # the node out of maintenance mode again.
        f"rabbitmq-upgrade drain -t {drain_seconds}"
    )
    return ["/bin/sh", "-c", script]


def _start_command(args: RabbitmqClusterArgs) -> list[str] | None:
    """``rabbitmq-server``, after pod 0 checked whether it lost its volume.

    From 4.1 the Kubernetes plugin makes ordinal 0 the seed: a node with an empty data
    directory joins pod 0, and pod 0 itself forms the cluster. So a pod 0 whose volume
    was lost (a deleted PVC, a replaced disk) founds a SECOND cluster beside the one
    pods 1..n still run - measured on the pod twin with 4.3.6 (docs/twin.md). Before
    starting, pod 0 without its node directory looks for a peer that accepts AMQP (its
    boot finished); if one does, it has that cluster forget the old pod 0 and joins it
    (classic peer discovery, in a conf.d file of its own) instead of seeding. On the
    very first start no peer has finished booting (they wait for pod 0): pod 0 seeds,
    after one refused TCP connection per peer. None (the image's own command) before
    4.1, whose plugin asks the Kubernetes API, or with a single replica.
    """
    rmq = args.rabbitmq
    if needs_kubernetes_api(rmq.version) or rmq.replicas < 2:
        return None
    hosts = " ".join(
        f"{STATEFULSET}-{i}.{HEADLESS_SERVICE}.{rmq.namespace}" for i in range(1, rmq.replicas)
    )
    conf_d = "/tmp/rabbitmq-conf.d"
    rejoin = (
        "cluster_formation.peer_discovery_backend = classic_config\\n"
        "cluster_formation.classic_config.nodes.1 = rabbit@%s\\n"
    )
    # bash (in the image) for /dev/tcp; no "$(" anywhere: the kubelet expands $(NAME).
    script = "; ".join(
        [
            f'if [ "${{MY_POD_NAME##*-}}" = 0 ] && [ ! -d "{DATA_DIR}/$RABBITMQ_NODENAME" ]',
            f"then for host in {hosts}",
            f'do if timeout 3 bash -c "echo > /dev/tcp/$host/{AMQP_PORT}" 2>/dev/null',
            'then echo "pod 0 has no data and $host runs RabbitMQ: joining its cluster"',
            'timeout 120 rabbitmqctl -q -n "rabbit@$host" forget_cluster_node '
            '"$RABBITMQ_NODENAME" || true',
            f"mkdir -p {conf_d}",
            f"cp /etc/rabbitmq/conf.d/*.conf {conf_d}/",
            f"printf '{rejoin}' \"$host\" > {conf_d}/90-rejoin.conf",
            f"export RABBITMQ_CONFIG_FILES={conf_d}",
            "break",
            "fi",
            "done",
            "fi",
            "exec rabbitmq-server",
        ]
    )
    return ["/bin/bash", "-c", script]


def _rabbitmq_container(args: RabbitmqClusterArgs) -> dict[str, Any]:
    rmq = args.rabbitmq
    env_suffix = []
    if needs_kubernetes_api(rmq.version):
        # Read by the plugin before 4.1 (node name = endpoint hostname + suffix).
        env_suffix = [
            {"name": "K8S_HOSTNAME_SUFFIX", "value": ".$(K8S_SERVICE_NAME).$(MY_POD_NAMESPACE)"}
        ]
    container: dict[str, Any] = {
        "name": "rabbitmq",
        "image": rmq.image,
        "imagePullPolicy": "IfNotPresent",
        "env": [
            {
                "name": "MY_POD_NAME",
                "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}},
            },
            {
                "name": "MY_POD_NAMESPACE",
                "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}},
            },
            {"name": "K8S_SERVICE_NAME", "value": HEADLESS_SERVICE},
            {"name": "RABBITMQ_USE_LONGNAME", "value": "true"},
            {
                "name": "RABBITMQ_NODENAME",
                "value": "rabbit@$(MY_POD_NAME).$(K8S_SERVICE_NAME).$(MY_POD_NAMESPACE)",
            },
            *env_suffix,
        ],
        "ports": [
            {"name": "epmd", "containerPort": EPMD_PORT, "protocol": "TCP"},
            {"name": "amqp", "containerPort": AMQP_PORT, "protocol": "TCP"},
            {"name": "management", "containerPort": MANAGEMENT_PORT, "protocol": "TCP"},
            {"name": "prometheus", "containerPort": PROMETHEUS_PORT, "protocol": "TCP"},
            {"name": "cluster-links", "containerPort": DIST_PORT, "protocol": "TCP"},
        ],
        "resources": rmq.resources.to_kubernetes(),
        # Ready = accepts AMQP connections: only then does the client Service route to it.
        "readinessProbe": {
            "tcpSocket": {"port": "amqp"},
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
            "successThreshold": 1,
        },
        # Not node_health_check (a no-op since 3.13): every listener accepts TCP,
        # i.e. the node has finished booting. The budget is long so a node waiting
        # for its peers after a full stop is never killed into a restart loop.
        "startupProbe": {
            "exec": {"command": ["rabbitmq-diagnostics", "-q", "check_port_connectivity"]},
            "periodSeconds": STARTUP_PERIOD_SECONDS,
            "timeoutSeconds": 10,
            "failureThreshold": STARTUP_BUDGET_SECONDS // STARTUP_PERIOD_SECONDS,
            "successThreshold": 1,
        },
        # No livenessProbe, on purpose (as the Cluster Operator): a node that is
        # paused by pause_minority, blocked by a memory/disk alarm or waiting for
        # peers fails any health check by design, and killing it makes a partition
        # or an overload worse. The Erlang VM exits on fatal errors by itself and
        # the kubelet restarts an exited container.
        "securityContext": kube.container_security_context(),
        "volumeMounts": [
            # Writable paths under a read-only root filesystem: $HOME (cookie, CLI
            # state), the data volume below it, logs/crash dumps, /tmp.
            {"name": "rabbitmq-home", "mountPath": HOME_DIR},
            {"name": "persistence", "mountPath": DATA_DIR},
            {"name": "rabbitmq-logs", "mountPath": "/var/log/rabbitmq"},
            {"name": "tmp", "mountPath": "/tmp"},
            # Single files, so the image's own conf.d/10-defaults.conf stays.
            {
                "name": "server-conf",
                "mountPath": "/etc/rabbitmq/rabbitmq.conf",
                "subPath": CONF_KEY,
                "readOnly": True,
            },
            {
                "name": "server-conf",
                "mountPath": "/etc/rabbitmq/enabled_plugins",
                "subPath": PLUGINS_KEY,
                "readOnly": True,
            },
            {
                "name": "credentials",
                "mountPath": f"/etc/rabbitmq/conf.d/{DEFAULT_USER_CONF_KEY}",
                "subPath": DEFAULT_USER_CONF_KEY,
                "readOnly": True,
            },
            {
                "name": "credentials",
                "mountPath": DEFINITIONS_FILE,
                "subPath": DEFINITIONS_KEY,
                "readOnly": True,
            },
            {"name": "pod-info", "mountPath": POD_INFO_DIR, "readOnly": True},
        ],
    }
    if rmq.replicas >= 3:
        # A quorum needs a majority of the other nodes: with fewer than three
        # nodes the hook could only wait for its whole timeout.
        container["lifecycle"] = {"preStop": {"exec": {"command": _prestop_command(args)}}}
    if (command := _start_command(args)) is not None:
        container["command"] = command
    return container


def _volumes() -> list[dict[str, Any]]:
    # 0440: with fsGroup 999 the kubelet makes Secret files group-readable anyway.
    secret_mode = 0o440
    return [
        {"name": "rabbitmq-home", "emptyDir": {}},
        {"name": "rabbitmq-logs", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "server-conf", "configMap": {"name": CONFIG_MAP}},
        {
            "name": "credentials",
            "secret": {
                "secretName": SECRET,
                "defaultMode": secret_mode,
                "items": [
                    {"key": DEFAULT_USER_CONF_KEY, "path": DEFAULT_USER_CONF_KEY},
                    {"key": DEFINITIONS_KEY, "path": DEFINITIONS_KEY},
                ],
            },
        },
        {
            "name": "erlang-cookie-secret",
            "secret": {
                "secretName": SECRET,
                "defaultMode": secret_mode,
                "items": [{"key": COOKIE_KEY, "path": COOKIE_KEY}],
            },
        },
        {
            "name": "pod-info",
            "downwardAPI": {
                "items": [
                    {
                        "path": SKIP_PRESTOP_LABEL,
                        "fieldRef": {"fieldPath": f"metadata.labels['{SKIP_PRESTOP_LABEL}']"},
                    }
                ]
            },
        },
    ]


def config_hash(args: RabbitmqClusterArgs) -> str:
    """Changes with the rendered configuration, so a change rolls the pods one by one."""
    # The definitions live in the Secret (they hold the password hashes); their
    # topology part, rendered without the users, is hashed here, with the users'
    # names: definitions are imported at boot only, so a new user needs a restart.
    topology = definitions_json(
        VHOST, delivery_limit=args.rabbitmq.delivery_limit, version=args.rabbitmq.version
    )
    users = [APP_USERNAME] + ([MONITOR_USERNAME] if args.monitor_namespace else [])
    data = json.dumps([config_map_data(args), topology, users], sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def stateful_set(args: RabbitmqClusterArgs) -> dict[str, Any]:
    rmq = args.rabbitmq
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(STATEFULSET, rmq.namespace),
        "spec": {
            "replicas": rmq.replicas,
            "selector": {"matchLabels": selector()},
            "serviceName": HEADLESS_SERVICE,
            # Start/stop all pods at once (OrderedReady can deadlock a full
            # restart); rolling updates still replace one pod at a time.
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate"},
            "persistentVolumeClaimRetentionPolicy": {
                "whenDeleted": rmq.pvc_retention,
                "whenScaled": "Retain",
            },
            "template": {
                "metadata": {
                    "labels": {**labels(), **selector()},
                    # No prometheus.io/* annotations: GKE Managed Prometheus ignores
                    # them (it scrapes what PodMonitoring objects select).
                    "annotations": {CONFIG_HASH_ANNOTATION: config_hash(args)},
                },
                "spec": {
                    "serviceAccountName": SERVICE_ACCOUNT,
                    # Peer discovery before 4.1 reads the token to call the API (with
                    # a hard match: a missing token file crashes the boot); from 4.1
                    # it makes no API call, and a pod needs no token at all.
                    "automountServiceAccountToken": needs_kubernetes_api(rmq.version),
                    "terminationGracePeriodSeconds": rmq.termination_grace_seconds,
                    "securityContext": {
                        **kube.pod_security_context(RABBITMQ_UID),
                        "fsGroupChangePolicy": "OnRootMismatch",
                    },
                    "affinity": {"podAntiAffinity": _anti_affinity(args)},
                    # Its own tainted pool: worker bursts land elsewhere.
                    **(pool_placement(RABBITMQ_POOL, tolerate=True) if args.dedicated_pool else {}),
                    "topologySpreadConstraints": [
                        {
                            "maxSkew": 1,
                            "topologyKey": "topology.kubernetes.io/zone",
                            "whenUnsatisfiable": "ScheduleAnyway",
                            "labelSelector": {"matchLabels": selector()},
                        }
                    ],
                    "initContainers": [_setup_container(args)],
                    "containers": [_rabbitmq_container(args)],
                    "volumes": _volumes(),
                },
            },
            "volumeClaimTemplates": [
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "metadata": {"name": "persistence", "labels": selector()},
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "storageClassName": storage_class_name(args),
                        "resources": {"requests": {"storage": rmq.storage_size}},
                    },
                }
            ],
        },
    }


def pod_disruption_budget(args: RabbitmqClusterArgs) -> dict[str, Any]:
    """Drains and upgrades take down one node at a time: a majority stays up."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(PDB, args.rabbitmq.namespace),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector()}},
    }


def _tcp(port: int) -> dict[str, Any]:
    return {"protocol": "TCP", "port": port}


def network_policy(args: RabbitmqClusterArgs) -> dict[str, Any]:
    """Who may talk to the RabbitMQ pods (ingress only; egress is left open).

    Not listed because NetworkPolicy never applies to them: kubelet probes and
    ``kubectl port-forward`` (traffic from the pod's own node is always allowed,
    port-forward connects to localhost inside the pod's network namespace), and a
    pod reaching itself. The peer rule still includes the pods themselves on
    5672/15672/15692 so the CLI health checks (check_port_connectivity connects to
    the node's own hostname) work even on a dataplane that filtered hairpin traffic.
    """
    peers = {"podSelector": {"matchLabels": selector()}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(NETWORK_POLICY, args.rabbitmq.namespace),
        "spec": {
            "podSelector": {"matchLabels": selector()},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    # AMQP: only pods that declare themselves clients, in the workers' namespace.
                    "from": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {
                                    "kubernetes.io/metadata.name": args.client_namespace
                                }
                            },
                            "podSelector": {"matchLabels": {names.AMQP_CLIENT_LABEL: "true"}},
                        }
                    ],
                    "ports": [_tcp(AMQP_PORT)],
                },
                {
                    # Clustering (epmd, distribution), CLI tools and checks: RabbitMQ pods only.
                    "from": [peers],
                    "ports": [
                        _tcp(EPMD_PORT),
                        _tcp(DIST_PORT),
                        # One by one, not endPort: Cilium before 1.16 (GKE
                        # Dataplane V2) ignored endPort ranges.
                        *(_tcp(port) for port in CLI_DIST_PORTS),
                        _tcp(AMQP_PORT),
                        _tcp(MANAGEMENT_PORT),
                        _tcp(PROMETHEUS_PORT),
                    ],
                },
                {
                    # Metrics: any pod in any namespace may scrape.
                    "from": [{"namespaceSelector": {}}],
                    "ports": [_tcp(PROMETHEUS_PORT)],
                },
                *_monitor_ingress(args),
            ],
        },
    }


def _monitor_ingress(args: RabbitmqClusterArgs) -> list[dict[str, Any]]:
    """KEDA's operator reads the queue depth from the management API."""
    if args.monitor_namespace is None:
        return []
    return [
        {
            "from": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": args.monitor_namespace}
                    }
                }
            ],
            "ports": [_tcp(MANAGEMENT_PORT)],
        }
    ]


def management_url(args: RabbitmqClusterArgs) -> str:
    """The management API through the client Service, as KEDA's scaler takes it: the
    vhost is the path (URL-encoded), the credentials come separately."""
    host = f"{CLIENT_SERVICE}.{args.rabbitmq.namespace}.svc.{CLUSTER_DOMAIN}"
    return f"http://{host}:{MANAGEMENT_PORT}/{quote(VHOST, safe='')}"


# --- registration ---------------------------------------------------------------------

register = kube.register


def stateful_set_timeouts(args: RabbitmqClusterArgs) -> pulumi.CustomTimeouts:
    """Longer than what Kubernetes itself may take, so Pulumi never gives up first."""
    rmq = args.rabbitmq
    # A rolling update replaces the pods one by one; each may drain for its
    # whole grace period and then boot for up to the startup budget.
    per_pod = rmq.termination_grace_seconds + STARTUP_BUDGET_SECONDS
    update_minutes = -(-rmq.replicas * per_pod // 60) + 5
    # Deletion stops every pod at once (Parallel): each runs its preStop hook
    # inside the grace period, then SIGTERM; pulumi-kubernetes' default is 10 min.
    delete_minutes = -(-rmq.termination_grace_seconds // 60) + 5
    return pulumi.CustomTimeouts(
        create="30m", update=f"{update_minutes}m", delete=f"{delete_minutes}m"
    )


class RabbitmqCluster(pulumi.ComponentResource):
    """The RabbitMQ StatefulSet and everything it needs, in its own namespace."""

    namespace: str
    namespace_object: pulumi.CustomResource
    broker_urls: pulumi.Output[list[str]]
    server: pulumi.CustomResource
    username: pulumi.Output[str]
    password: pulumi.Output[str]
    #: MONITOR_USERNAME's password (None without autoscaling).
    monitor_password: pulumi.Output[str] | None
    management_url: str

    def __init__(
        self,
        name: str,
        args: RabbitmqClusterArgs,
        provider: k8s.Provider,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("celerycluster:rabbitmq:RabbitmqCluster", name, {}, opts)
        rmq = args.rabbitmq
        self.namespace = rmq.namespace

        # Generated once and kept in the state (secret): never a literal.
        own = pulumi.ResourceOptions(parent=self)
        cookie = random.RandomPassword(f"{name}-erlang-cookie", length=48, special=False, opts=own)
        app_password = random.RandomPassword(
            f"{name}-app-password", length=32, special=False, opts=own
        )
        monitor_password: pulumi.Output[str | None] = pulumi.Output.from_input(None)
        self.monitor_password = None
        if args.monitor_namespace is not None:
            monitor = random.RandomPassword(
                f"{name}-monitor-password", length=32, special=False, opts=own
            )
            monitor_password = monitor.result
            self.monitor_password = pulumi.Output.secret(monitor.result)
        self.management_url = management_url(args)
        self.username = pulumi.Output.secret(APP_USERNAME)
        self.password = pulumi.Output.secret(app_password.result)
        self.broker_urls = pulumi.Output.secret(
            app_password.result.apply(lambda p: broker_urls(args, APP_USERNAME, p))
        )

        child = pulumi.ResourceOptions(parent=self, provider=provider)
        ns = register(f"{name}-namespace", namespace(args), child)
        self.namespace_object = ns  # what objects placed in this namespace depend on
        in_ns = pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=[ns]))

        dependencies: list[pulumi.Resource] = []
        if manages_storage_class(args):
            dependencies.append(
                register(
                    f"{name}-storage-class",
                    storage_class(args),
                    pulumi.ResourceOptions.merge(
                        child, pulumi.ResourceOptions(protect=args.protect)
                    ),
                )
            )

        data: pulumi.Output[dict[str, str]] = pulumi.Output.all(
            cookie.result, app_password.result, monitor_password
        ).apply(
            lambda v: secret_data(
                secret_string_data(args, erlang_cookie=v[0], password=v[1], monitor_password=v[2])
            )
        )
        dependencies += [
            register(f"{name}-credentials", secret(args, pulumi.Output.secret(data)), in_ns),
            register(f"{name}-config", config_map(args), in_ns),
            register(f"{name}-service-account", service_account(args), in_ns),
            register(f"{name}-headless", headless_service(args), in_ns),
        ]
        if needs_kubernetes_api(rmq.version):
            dependencies += [
                register(f"{name}-role", role(args), in_ns),
                register(f"{name}-role-binding", role_binding(args), in_ns),
            ]
        register(f"{name}-client", client_service(args), in_ns)
        register(f"{name}-pdb", pod_disruption_budget(args), in_ns)
        register(f"{name}-network-policy", network_policy(args), in_ns)
        # The data lives here (and in the PVCs it creates): protected in production.
        # Awaited until every pod is Ready: what depends on it finds a broker.
        self.server = register(
            f"{name}-server",
            stateful_set(args),
            pulumi.ResourceOptions.merge(
                in_ns,
                pulumi.ResourceOptions(
                    depends_on=dependencies,
                    protect=args.protect,
                    custom_timeouts=stateful_set_timeouts(args),
                ),
            ),
        )

        self.register_outputs(
            {
                "namespace": self.namespace,
                "broker_urls": self.broker_urls,
                "username": self.username,
                "password": self.password,
            }
        )
