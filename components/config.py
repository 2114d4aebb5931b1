"""The typed stack configuration: every key the program reads, in one place.

`Pulumi.<stack>.yaml` replaces the article's Helm values. All project keys are
read here into frozen dataclasses and validated BEFORE any resource is
created, so a typo or a dangerous value stops `pulumi up` with a message that
names the key, the value and what is allowed, and nothing is half-built.

Defaults are the durable choice (Retain volumes, deletion protection on,
required anti-affinity): a key forgotten in a stack file never deletes data.
`Pulumi.dev.yaml` opts into the cheap, disposable values explicitly.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

from components.rabbitmq_conf import memory_available

PROJECT = "celery-cluster"

Target = Literal["gke", "existing"]
Environment = Literal["development", "production"]
ReleaseChannel = Literal["RAPID", "REGULAR", "STABLE"]
# How kubectl, CI and the program reach the GKE control plane: "dns", only the
# IAM-gated DNS endpoint (IP endpoint off); "ip", the IP endpoint, reachable
# from gke.authorizedNetworks only.
ControlPlaneAccess = Literal["dns", "ip"]
NodeDiskType = Literal["pd-standard", "pd-balanced", "pd-ssd"]
AntiAffinity = Literal["required", "preferred"]
RetentionPolicy = Literal["Retain", "Delete"]
WorkerPool = Literal["threads", "prefork", "solo"]
# KEDA: the program installs it (Helm chart, pinned), finds one already installed, or
# the workers keep a fixed replica count.
KedaInstall = Literal["install", "existing", "none"]

# The storage classes this program creates itself (the article's two options,
# through the GCE PD CSI driver). Any other name refers to a class that already
# exists in the cluster (e.g. "standard" on minikube or kind).
MANAGED_STORAGE_TYPES = ("pd-ssd", "pd-balanced")

# Kubernetes minor versions whose API the manifests are written (and
# schema-checked) for. persistentVolumeClaimRetentionPolicy is on by default
# from 1.27 and GA in 1.32.
SUPPORTED_KUBERNETES_VERSIONS = ("1.30", "1.31", "1.32", "1.33", "1.34", "1.35")

_GCE_MACHINE_TYPE = re.compile(r"^[a-z][a-z0-9]*-(custom-\d+-\d+|[a-z]+(-\d+)?)(-ext)?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m)?$")
_STORAGE_SIZE = re.compile(r"^[1-9][0-9]*(Mi|Gi|Ti)$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_GCP_REGION = re.compile(r"^[a-z]+-[a-z]+[0-9]+$")
_GCP_ZONE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")
_GCP_PROJECT = re.compile(r"^[a-z][-a-z0-9]{4,28}[a-z0-9]$")
# A GKE version as `min_master_version` takes it: a minor ("1.33"), a patch
# ("1.33.5") or a full GKE version ("1.33.5-gke.1000").
_GKE_VERSION = re.compile(r"^(?P<minor>\d+\.\d+)(\.\d+(-gke\.\d+)?)?$")
_CIDR = re.compile(r"^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})/(\d{1,2})$")
# The official image, management variant, its version in the tag (a digest may
# follow): the version decides what rabbitmq.conf may contain.
_RABBITMQ_IMAGE = re.compile(
    r"^(?:docker\.io/library/)?rabbitmq:(?P<version>\d+\.\d+\.\d+)-management"
    r"(?:@sha256:[0-9a-f]{64})?$"
)
_RABBITMQ_IMAGE_ALLOWED = (
    "the official 'rabbitmq' image, management variant, with a pinned version tag, "
    "e.g. rabbitmq:4.3.6-management (optionally followed by @sha256:<digest>)"
)
_IMAGE_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_QUANTITY_FACTORS = {
    "": 1,
    "m": 0.001,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}

# The disk alarm blocks publishers while this much is still free. Production:
# 1.5 x the memory RabbitMQ may use (its production checklist: 1.0 at least, 1.5
# safer), so a node can always page its memory out to disk. Development: the
# Cluster Operator's 2GB.
PRODUCTION_DISK_FREE_RELATIVE = 1.5
DEVELOPMENT_DISK_FREE_BYTES = 2 * 10**9
# The volume must hold at least as much message data as the alarm keeps free.
MIN_STORAGE_PER_DISK_FREE_LIMIT = 2


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes quantity ("4Gi", "512Mi", "2G", "1.5Gi") in bytes (whole bytes)."""
    match = _QUANTITY.match(quantity)
    if match is None:
        raise ValueError(f"not a Kubernetes quantity: {quantity!r}")
    suffix = match[2] or ""
    number = quantity[: len(quantity) - len(suffix)]
    return int(float(number) * _QUANTITY_FACTORS[suffix])


class ConfigError(ValueError):
    """A stack configuration value that is not allowed.

    The message always names the full key, the value and what is allowed.
    """

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"invalid config {key} = {value!r}: {allowed}")


@dataclass(frozen=True)
class Resources:
    """Container requests and limits (Kubernetes quantities); limits are optional."""

    cpu_request: str = "250m"
    memory_request: str = "512Mi"
    cpu_limit: str | None = None
    memory_limit: str | None = None

    def to_kubernetes(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {
            "requests": {"cpu": self.cpu_request, "memory": self.memory_request}
        }
        limits = {
            name: value
            for name, value in (("cpu", self.cpu_limit), ("memory", self.memory_limit))
            if value is not None
        }
        if limits:
            out["limits"] = limits
        return out


@dataclass(frozen=True)
class WorkerPoolConfig:
    """The workers' own node pool, grown and shrunk by GKE's cluster autoscaler.

    Off: one pool runs everything (dev may). On: the main pool is RabbitMQ's alone
    (tainted), and a burst of workers grows this pool instead of squeezing a broker.
    """

    enabled: bool = True
    machine_type: str = "e2-standard-2"
    # Per zone, as the main pool's nodesPerZone.
    min_nodes_per_zone: int = 1
    max_nodes_per_zone: int = 3
    spot: bool = False


@dataclass(frozen=True)
class GkeConfig:
    """The GKE cluster: a zonal cluster when `zone` is set, regional otherwise."""

    region: str = "us-east1"
    zone: str | None = "us-east1-c"
    # Zonal: nodes in the zone. Regional: nodes in EACH of the region's zones.
    nodes_per_zone: int = 3
    machine_type: str = "e2-standard-2"
    spot: bool = False
    disk_type: NodeDiskType = "pd-balanced"
    disk_size_gb: int = 50
    release_channel: ReleaseChannel = "REGULAR"
    deletion_protection: bool = True
    subnet_cidr: str = "10.10.0.0/20"
    pods_cidr: str = "10.20.0.0/14"
    services_cidr: str = "10.24.0.0/20"
    control_plane: ControlPlaneAccess = "dns"
    # CIDRs that may reach the IP endpoint (controlPlane "ip" only).
    authorized_networks: tuple[str, ...] = ()
    # None: the release channel's default version. A pinned version goes stale
    # when the channel stops offering it, and cluster creation then fails.
    min_master_version: str | None = None
    worker_pool: WorkerPoolConfig = field(default_factory=WorkerPoolConfig)

    @property
    def location(self) -> str:
        return self.zone or self.region

    @property
    def node_count(self) -> int:
        """Nodes the pool gives in total: GKE regions have three zones by default."""
        return self.nodes_per_zone * (1 if self.zone else 3)


@dataclass(frozen=True)
class KubernetesConfig:
    version: str = "1.33"
    # For target "existing": the kubeconfig context to deploy into ("" = current).
    context: str = ""


MIN_NET_TICKTIME = 5
MAX_NET_TICKTIME = 120


@dataclass(frozen=True)
class RabbitmqConfig:
    replicas: int = 3
    # The official image, management variant, tag pinned: no custom image, no join
    # script. Declared here only (the stack files inherit it): the pod twin boots
    # this major.minor from a Debian root (localcluster.rootfs), and a test holds
    # the two together.
    image: str = "rabbitmq:4.3.6-management"
    namespace: str = "rabbitmq"
    storage_class: str = "pd-ssd"
    storage_size: str = "10Gi"
    anti_affinity: AntiAffinity = "required"
    pvc_retention: RetentionPolicy = "Retain"
    delivery_limit: int = 5
    # preStop drains the node (waits for quorum queues to keep a majority
    # elsewhere, then moves clients off) before Kubernetes sends SIGKILL.
    termination_grace_seconds: int = 600
    # How soon the other nodes declare a silently lost node down (Erlang's
    # net_ticktime; detection after 0.75-1.25 x this). Until then the channels on
    # the healthy nodes keep sending quorum-queue commands to the lost leader and
    # every worker waits: measured on the pod twin (machine-loss, 2026-12-01),
    # RabbitMQ's default 60 s stalled all work 45.8 s; 10 s stalled it 8.7 s with the
    # scheduler's confirms stalled 12.2 s (nodes declared it down after ~12 s); 8 s
    # stalled work 8.3 s and confirms 9.8 s (down after ~9.5 s) with the queue's
    # leader lost. The price, measured (broker-pause): a node paused 4-8 s (GC, CPU
    # starvation, a VM migration) was never declared down, one paused 10-12 s was,
    # after ~9 s, and rejoined by itself ~3 s after the thaw (nothing lost, a few
    # duplicates). RabbitMQ's docs advise against values under 5 s.
    net_ticktime_seconds: int = 8
    resources: Resources = field(default_factory=lambda: Resources("500m", "1Gi", "1", "2Gi"))

    @property
    def memory_limit_bytes(self) -> int | None:
        limit = self.resources.memory_limit
        return None if limit is None else quantity_bytes(limit)

    def disk_free_limit_bytes(self, production: bool) -> int:
        """Free disk below which RabbitMQ blocks publishers (rendered into rabbitmq.conf)."""
        memory = self.memory_limit_bytes
        if not production or memory is None:
            return DEVELOPMENT_DISK_FREE_BYTES
        return int(memory_available(memory) * PRODUCTION_DISK_FREE_RELATIVE)

    @property
    def version(self) -> str:
        """The RabbitMQ version the image tag pins, e.g. "4.1.4" (the renderer needs it)."""
        match = _RABBITMQ_IMAGE.match(self.image)
        if match is None:
            raise ConfigError(_key("rabbitmq.image"), self.image, _RABBITMQ_IMAGE_ALLOWED)
        return match["version"]


#: Bounds of workers.scheduler.publishWindow: 1 (a confirm per publish) to what one
#: channel should hold unconfirmed.
MIN_PUBLISH_WINDOW = 1
MAX_PUBLISH_WINDOW = 10_000


@dataclass(frozen=True)
class SchedulerConfig:
    """The article's scheduler, as a Kubernetes Job that enqueues `tasks` count tasks."""

    enabled: bool = False
    tasks: int = 10_000
    task_seconds: float = 1.0
    # Publishes in flight unconfirmed (app/pipeline.py): each task id still counts only
    # once RabbitMQ confirmed it; 1 waits for every confirm (~1.4 ms a task on the twin).
    publish_window: int = 256
    # Change it to enqueue the tasks again: a run is identified by its own settings
    # (runId, tasks, taskSeconds), so a new worker image never re-runs it.
    run_id: str = "1"


@dataclass(frozen=True)
class WorkersConfig:
    replicas: int = 3
    # The article's tasks sleep: an I/O pool runs far more of them per pod than prefork.
    pool: WorkerPool = "threads"
    concurrency: int = 32
    # A prebuilt image reference (pinned tag or digest). Empty: build app/ and
    # push it to an Artifact Registry repository this program creates.
    image: str = ""
    namespace: str = "workers"
    # The longest task's run time: the grace period lets a warm shutdown finish it.
    longest_task_seconds: int = 10
    resources: Resources = field(default_factory=lambda: Resources("250m", "256Mi", "1", "512Mi"))
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    @property
    def termination_grace_seconds(self) -> int:
        return max(60, self.longest_task_seconds + 30)

    @property
    def serves_metrics(self) -> bool:
        """The workers serve app.metrics: every pool but prefork, whose tasks run in
        child processes one HTTP server cannot count."""
        return self.pool != "prefork"


@dataclass(frozen=True)
class MonitoringConfig:
    """GKE Managed Prometheus: what it scrapes, when alerts fire (components/monitoring.py)."""

    #: PodMonitoring and Rules objects, and managed collection on the GKE cluster.
    managed_prometheus: bool = True
    scrape_interval_seconds: int = 30
    #: A RabbitMQ pod missing (or cut off from its peers) this long pages. A pod
    #: replaced by its StatefulSet is back in ~1 min: longer than that is not a restart.
    node_down_seconds: int = 120
    #: A worker pod not answering its metrics scrape this long warns (``CeleryWorkerDown``):
    #: longer than a worker's restart (a killed container is back in seconds).
    worker_down_seconds: int = 300
    #: The backlog grew for this long: workers fall behind.
    backlog_window_seconds: int = 900
    #: A task queued now would wait longer than this at the current completion rate.
    backlog_wait_seconds: int = 600


#: KEDA's Helm chart (https://kedacore.github.io/charts), pinned, and the Kubernetes
#: minors it supports (built against 1.35, KEDA supports N-2).
KEDA_CHART_VERSION = "2.20.2"
KEDA_KUBERNETES_VERSIONS = ("1.33", "1.34", "1.35")


@dataclass(frozen=True)
class AutoscalingConfig:
    """Workers follow the queue: a KEDA ScaledObject on the worker Deployment
    (components/autoscaling.py)."""

    keda: KedaInstall = "install"
    #: Where KEDA runs: the namespace the program installs it into, or the existing one's.
    keda_namespace: str = "keda"
    keda_chart_version: str = KEDA_CHART_VERSION
    #: At least one worker always consumes: CeleryNoConsumer stays meaningful and the
    #: first task of a quiet hour does not wait for a poll and a pod start.
    min_replicas: int = 1
    max_replicas: int = 12
    #: Ready + unacknowledged messages one worker pod is meant to hold; None: its
    #: concurrency (one replica per pod-full of running tasks, more once tasks queue).
    messages_per_replica: int | None = None
    polling_interval_seconds: int = 15
    #: How long the wanted replica count must stay lower before workers are removed
    #: (the HPA's scale-down stabilization window).
    cooldown_seconds: int = 300


@dataclass(frozen=True)
class StackConfig:
    stack: str
    target: Target = "gke"
    environment: Environment = "production"
    gcp_project: str = ""
    gke: GkeConfig = field(default_factory=GkeConfig)
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)
    rabbitmq: RabbitmqConfig = field(default_factory=RabbitmqConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)

    @property
    def production(self) -> bool:
        return self.environment == "production"

    @property
    def protect(self) -> bool:
        """Pulumi `protect` on what holds data or takes long to rebuild."""
        return self.production

    @property
    def dedicated_pools(self) -> bool:
        """RabbitMQ on its own (tainted) node pool, workers on an autoscaled one."""
        return self.target == "gke" and self.gke.worker_pool.enabled

    @property
    def autoscaled(self) -> bool:
        """A KEDA ScaledObject owns the worker Deployment's replica count."""
        return self.autoscaling.keda != "none"

    @property
    def messages_per_replica(self) -> int:
        wanted = self.autoscaling.messages_per_replica
        return self.workers.concurrency if wanted is None else wanted


# --- reading -----------------------------------------------------------------

# Top-level project keys and the StackConfig field each one fills.
_TOP_LEVEL = {
    "target": "target",
    "environment": "environment",
    "gke": "gke",
    "kubernetes": "kubernetes",
    "rabbitmq": "rabbitmq",
    "workers": "workers",
    "monitoring": "monitoring",
    "autoscaling": "autoscaling",
}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _unknown_key(key: str, allowed: typing.Iterable[str]) -> ConfigError:
    allowed = sorted(allowed)
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1].split(":")[-1], allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(key, "<set>", f"unknown key{hint}; allowed keys: {', '.join(allowed)}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check one value against its dataclass type hint; build nested dataclasses."""
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(key, value, "expected an object")
        return _build(typing.cast(type, hint), value, key)
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise ConfigError(key, value, f"one of {', '.join(map(repr, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, options[0], key)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(key, value, "a list")
        item = get_args(hint)[0]
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, "true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, value, "a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "a string")
        return value
    raise TypeError(f"no coercion for {hint!r} at {key}")  # a bug in this module


def _build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    by_key = {_camel(f.name): f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in raw.items():
        if key not in by_key:
            raise _unknown_key(f"{prefix}.{key}", by_key)
        name = by_key[key]
        kwargs[name] = _coerce(value, hints[name], f"{prefix}.{key}")
    return cls(**kwargs)


def _decode(key: str, value: Any) -> Any:
    """Pulumi hands structured values to the program as JSON text."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def load_stack_config(raw: Mapping[str, Any], stack: str) -> StackConfig:
    """Build and validate the stack configuration from Pulumi's flat config map.

    `raw` maps full keys ("celery-cluster:rabbitmq", "gcp:project") to values.
    Keys of other namespaces (providers) are left to their owners, except
    `gcp:project`, which the GKE target needs.
    """
    fields: dict[str, Any] = {"stack": stack}
    hints = typing.get_type_hints(StackConfig)
    for full_key, value in sorted(raw.items()):
        namespace, _, key = full_key.partition(":")
        if namespace != PROJECT:
            continue
        if key not in _TOP_LEVEL:
            raise _unknown_key(full_key, _TOP_LEVEL)
        name = _TOP_LEVEL[key]
        fields[name] = _coerce(_decode(full_key, value), hints[name], full_key)
    fields["gcp_project"] = raw.get("gcp:project") or ""
    config = StackConfig(**fields)
    validate(config)
    return config


# --- validation --------------------------------------------------------------


def _key(path: str) -> str:
    return f"{PROJECT}:{path}"


def _check_quantity(path: str, value: str | None) -> None:
    if value is not None and not _QUANTITY.match(value):
        raise ConfigError(_key(path), value, "a Kubernetes quantity such as 500m, 1, 512Mi or 2Gi")


def _check_resources(path: str, resources: Resources) -> None:
    for name in ("cpu_request", "memory_request", "cpu_limit", "memory_limit"):
        _check_quantity(f"{path}.{_camel(name)}", getattr(resources, name))


def _check_image(path: str, image: str) -> None:
    if "@sha256:" in image:
        return
    _, sep, tag = image.rpartition(":")
    if not sep or "/" in tag or not _IMAGE_TAG.match(tag) or tag == "latest":
        raise ConfigError(
            _key(path), image, "an image with a pinned tag or digest (not 'latest' or untagged)"
        )


def _check_rabbitmq_image(image: str) -> None:
    if _RABBITMQ_IMAGE.match(image):
        return
    name = image.split("@", 1)[0].rpartition(":")[0] or image.split("@", 1)[0]
    if name not in ("rabbitmq", "docker.io/library/rabbitmq"):
        problem = "not the official image"
    elif not re.search(r":\d+\.\d+\.\d+", image):
        problem = "no pinned version tag"
    else:
        problem = "not the management variant"
    raise ConfigError(_key("rabbitmq.image"), image, f"{problem}: {_RABBITMQ_IMAGE_ALLOWED}")


def _minor(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2])


def _check_min_master_version(config: StackConfig) -> None:
    pinned = config.gke.min_master_version
    if pinned is None:
        return
    match = _GKE_VERSION.match(pinned)
    if match is None:
        raise ConfigError(
            _key("gke.minMasterVersion"),
            pinned,
            "a GKE version such as 1.33, 1.33.5 or 1.33.5-gke.1000, "
            "or null for the release channel's default",
        )
    if _minor(match["minor"]) < _minor(config.kubernetes.version):
        raise ConfigError(
            _key("gke.minMasterVersion"),
            pinned,
            f"at least kubernetes.version ({config.kubernetes.version}), "
            "the API the manifests are written for",
        )


def _check_control_plane(gke: GkeConfig) -> None:
    for i, cidr in enumerate(gke.authorized_networks):
        _check_cidr(f"gke.authorizedNetworks[{i}]", cidr)
    if gke.control_plane == "dns" and gke.authorized_networks:
        raise ConfigError(
            _key("gke.authorizedNetworks"),
            list(gke.authorized_networks),
            "empty when controlPlane is 'dns': the IP endpoint they would open is off",
        )
    if gke.control_plane == "ip" and not gke.authorized_networks:
        raise ConfigError(
            _key("gke.authorizedNetworks"),
            [],
            "at least one CIDR when controlPlane is 'ip' (e.g. your network's "
            "203.0.113.0/24): nothing else may reach the IP endpoint",
        )


def _check_cidr(path: str, value: str) -> None:
    match = _CIDR.match(value)
    if not match or any(int(octet) > 255 for octet in match.groups()[:4]) or int(match[5]) > 32:
        raise ConfigError(_key(path), value, "an IPv4 CIDR range such as 10.10.0.0/20")


def _check_rabbitmq_memory(rmq: RabbitmqConfig, production: bool) -> None:
    """A memory limit in every stack (RabbitMQ sizes its alarm from it) and a volume
    large enough for the disk alarm's threshold."""
    from components.rabbitmq_conf import memory_available

    limit = rmq.memory_limit_bytes
    if limit is None or limit < 256 * 2**20:
        raise ConfigError(
            _key("rabbitmq.resources.memoryLimit"),
            rmq.resources.memory_limit,
            "a memory limit of at least 256Mi in every stack: RabbitMQ sizes its memory "
            "alarm from it (without one it reads the node's memory and is OOM-killed first)",
        )
    request = quantity_bytes(rmq.resources.memory_request)
    if request > limit:
        raise ConfigError(
            _key("rabbitmq.resources.memoryRequest"),
            rmq.resources.memory_request,
            f"at most memoryLimit ({rmq.resources.memory_limit})",
        )
    disk_free = rmq.disk_free_limit_bytes(production)
    if quantity_bytes(rmq.storage_size) < MIN_STORAGE_PER_DISK_FREE_LIMIT * disk_free:
        why = (
            f"{PRODUCTION_DISK_FREE_RELATIVE} x the {memory_available(limit) / 2**30:.2f} GiB "
            "RabbitMQ may use within memoryLimit"
            if production
            else "the development default"
        )
        raise ConfigError(
            _key("rabbitmq.storageSize"),
            rmq.storage_size,
            f"at least {MIN_STORAGE_PER_DISK_FREE_LIMIT} x the disk alarm's free-space "
            f"threshold of {disk_free / 2**30:.2f} GiB ({why})",
        )


#: Each monitoring setting: (least, most) seconds allowed.
MONITORING_SECONDS = {
    "scrape_interval_seconds": (5, 300),
    "node_down_seconds": (0, 3600),
    "worker_down_seconds": (0, 3600),
    "backlog_window_seconds": (120, 86_400),
    "backlog_wait_seconds": (10, 86_400),
}


def _check_ranges(section: str, settings: object, bounds: Mapping[str, tuple[int, int]]) -> None:
    """Each of ``settings``' fields named in ``bounds`` within its (least, most)."""
    for name, (least, most) in bounds.items():
        value = getattr(settings, name)
        if not least <= value <= most:
            raise ConfigError(
                _key(f"{section}.{_camel(name)}"), value, f"an integer from {least} to {most}"
            )


def _check_min_max(
    section: str, names: tuple[str, str], values: tuple[int, int], most: int, why_least: str
) -> None:
    """A (minimum, maximum) pair: the minimum from 1 to ``most`` (``why_least`` says why
    not 0), the maximum from the minimum to ``most``."""
    (low_name, high_name), (low, high) = names, values
    if not 1 <= low <= most:
        raise ConfigError(
            _key(f"{section}.{low_name}"), low, f"an integer from 1 to {most}: {why_least}"
        )
    if not low <= high <= most:
        raise ConfigError(
            _key(f"{section}.{high_name}"),
            high,
            f"an integer from {section}.{low_name} ({low}) to {most}",
        )


def _check_monitoring(monitoring: MonitoringConfig) -> None:
    _check_ranges("monitoring", monitoring, MONITORING_SECONDS)
    # The queue metrics are scraped every other interval; a trend needs two samples.
    if monitoring.backlog_window_seconds < 4 * monitoring.scrape_interval_seconds:
        raise ConfigError(
            _key("monitoring.backlogWindowSeconds"),
            monitoring.backlog_window_seconds,
            "at least 4 x monitoring.scrapeIntervalSeconds "
            f"({4 * monitoring.scrape_interval_seconds}): two samples of the queue metrics",
        )


MAX_NODES_PER_ZONE = 1000  # GKE's limit per node pool and zone
MAX_WORKER_REPLICAS = 1000
#: Each autoscaling setting in seconds: (least, most) allowed.
AUTOSCALING_SECONDS = {"polling_interval_seconds": (5, 3600), "cooldown_seconds": (0, 86_400)}
_HELM_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def _check_worker_pool(config: StackConfig) -> None:
    pool = config.gke.worker_pool
    if not pool.enabled:
        return
    if not _GCE_MACHINE_TYPE.match(pool.machine_type):
        raise ConfigError(
            _key("gke.workerPool.machineType"),
            pool.machine_type,
            "a Compute Engine machine type such as e2-standard-2",
        )
    _check_min_max(
        "gke.workerPool",
        ("minNodesPerZone", "maxNodesPerZone"),
        (pool.min_nodes_per_zone, pool.max_nodes_per_zone),
        MAX_NODES_PER_ZONE,
        "RabbitMQ's pool is tainted, so cluster services (DNS, KEDA, metrics collectors) "
        "need a worker node",
    )
    if pool.spot and config.production:
        raise ConfigError(
            _key("gke.workerPool.spot"),
            pool.spot,
            "false in a production stack: a spot VM gets 30 s notice, less than the "
            f"workers' {config.workers.termination_grace_seconds} s warm shutdown "
            "(their tasks are redelivered, not lost, but run twice)",
        )


def _check_autoscaling(config: StackConfig) -> None:
    scaling = config.autoscaling
    if not config.autoscaled:
        return
    if not _DNS_LABEL.match(scaling.keda_namespace):
        raise ConfigError(
            _key("autoscaling.kedaNamespace"),
            scaling.keda_namespace,
            "a lowercase DNS label (a-z, 0-9, '-'; at most 63)",
        )
    if scaling.keda_namespace in (config.rabbitmq.namespace, config.workers.namespace):
        raise ConfigError(
            _key("autoscaling.kedaNamespace"),
            scaling.keda_namespace,
            "a namespace of its own, not RabbitMQ's or the workers'",
        )
    if not _HELM_VERSION.match(scaling.keda_chart_version):
        raise ConfigError(
            _key("autoscaling.kedaChartVersion"),
            scaling.keda_chart_version,
            f"a pinned chart version such as {KEDA_CHART_VERSION}",
        )
    if (
        scaling.keda == "install"
        and scaling.keda_chart_version == KEDA_CHART_VERSION
        and config.kubernetes.version not in KEDA_KUBERNETES_VERSIONS
    ):
        raise ConfigError(
            _key("kubernetes.version"),
            config.kubernetes.version,
            f"one of {', '.join(KEDA_KUBERNETES_VERSIONS)} with KEDA {KEDA_CHART_VERSION} "
            "(autoscaling.keda: install), or pin a KEDA chart that supports it "
            "(autoscaling.kedaChartVersion)",
        )
    _check_min_max(
        "autoscaling",
        ("minReplicas", "maxReplicas"),
        (scaling.min_replicas, scaling.max_replicas),
        MAX_WORKER_REPLICAS,
        "a worker always consumes (scaling to zero leaves new tasks waiting for a poll and "
        "a pod start)",
    )
    if scaling.messages_per_replica is not None and scaling.messages_per_replica < 1:
        raise ConfigError(
            _key("autoscaling.messagesPerReplica"),
            scaling.messages_per_replica,
            "an integer >= 1, or null for workers.concurrency",
        )
    _check_ranges("autoscaling", scaling, AUTOSCALING_SECONDS)


def validate(config: StackConfig) -> None:
    """Reject values that are malformed or dangerous for this stack's environment."""
    gke, rmq, workers = config.gke, config.rabbitmq, config.workers
    _check_monitoring(config.monitoring)
    _check_worker_pool(config)
    _check_autoscaling(config)

    if config.target == "gke":
        if not config.gcp_project:
            raise ConfigError(
                "gcp:project",
                None,
                "required when target is 'gke': pulumi config set gcp:project <your-project-id>",
            )
        if not _GCP_PROJECT.match(config.gcp_project):
            raise ConfigError(
                "gcp:project",
                config.gcp_project,
                "a GCP project id (6-30 lowercase letters, digits, hyphens)",
            )
    if not _GCP_REGION.match(gke.region):
        raise ConfigError(_key("gke.region"), gke.region, "a GCP region such as us-east1")
    if gke.zone is not None:
        if not _GCP_ZONE.match(gke.zone):
            raise ConfigError(_key("gke.zone"), gke.zone, "a GCP zone such as us-east1-c")
        if not gke.zone.startswith(gke.region + "-"):
            raise ConfigError(
                _key("gke.zone"),
                gke.zone,
                f"a zone of the configured region {gke.region!r}, e.g. {gke.region}-b",
            )
    if not _GCE_MACHINE_TYPE.match(gke.machine_type):
        raise ConfigError(
            _key("gke.machineType"),
            gke.machine_type,
            "a Compute Engine machine type such as e2-standard-2",
        )
    if gke.nodes_per_zone < 1:
        raise ConfigError(_key("gke.nodesPerZone"), gke.nodes_per_zone, "an integer >= 1")
    if not 10 <= gke.disk_size_gb <= 65536:
        raise ConfigError(
            _key("gke.diskSizeGb"), gke.disk_size_gb, "an integer between 10 and 65536"
        )
    for name in ("subnet_cidr", "pods_cidr", "services_cidr"):
        _check_cidr(f"gke.{_camel(name)}", getattr(gke, name))

    if config.kubernetes.version not in SUPPORTED_KUBERNETES_VERSIONS:
        raise ConfigError(
            _key("kubernetes.version"),
            config.kubernetes.version,
            f"one of {', '.join(SUPPORTED_KUBERNETES_VERSIONS)}",
        )
    _check_min_master_version(config)
    _check_control_plane(gke)

    if rmq.replicas < 1:
        raise ConfigError(_key("rabbitmq.replicas"), rmq.replicas, "an integer >= 1")
    if config.production and (rmq.replicas < 3 or rmq.replicas % 2 == 0):
        raise ConfigError(
            _key("rabbitmq.replicas"),
            rmq.replicas,
            "an odd number >= 3 in a production stack: quorum queues and pause_minority "
            "need a strict majority to survive losing a node",
        )
    _check_rabbitmq_image(rmq.image)
    for path, name in (
        ("rabbitmq.namespace", rmq.namespace),
        ("workers.namespace", workers.namespace),
        ("rabbitmq.storageClass", rmq.storage_class),
    ):
        if not _DNS_LABEL.match(name):
            raise ConfigError(_key(path), name, "a lowercase DNS label (a-z, 0-9, '-'; at most 63)")
    if not _STORAGE_SIZE.match(rmq.storage_size):
        raise ConfigError(
            _key("rabbitmq.storageSize"), rmq.storage_size, "a size in Mi, Gi or Ti such as 10Gi"
        )
    if config.target != "gke" and rmq.storage_class in MANAGED_STORAGE_TYPES:
        raise ConfigError(
            _key("rabbitmq.storageClass"),
            rmq.storage_class,
            "the name of a storage class that exists in the cluster "
            "(pd-ssd and pd-balanced need target 'gke')",
        )
    if rmq.delivery_limit < 1:
        raise ConfigError(_key("rabbitmq.deliveryLimit"), rmq.delivery_limit, "an integer >= 1")
    if not MIN_NET_TICKTIME <= rmq.net_ticktime_seconds <= MAX_NET_TICKTIME:
        raise ConfigError(
            _key("rabbitmq.netTicktimeSeconds"),
            rmq.net_ticktime_seconds,
            f"an integer from {MIN_NET_TICKTIME} to {MAX_NET_TICKTIME} (seconds; below "
            f"{MIN_NET_TICKTIME} a busy node is taken for dead, RabbitMQ's default is 60)",
        )
    if rmq.termination_grace_seconds < 60:
        raise ConfigError(
            _key("rabbitmq.terminationGraceSeconds"),
            rmq.termination_grace_seconds,
            "an integer >= 60: the preStop drain needs time",
        )
    if config.target == "gke" and rmq.anti_affinity == "required" and gke.node_count < rmq.replicas:
        raise ConfigError(
            _key("rabbitmq.replicas"),
            rmq.replicas,
            f"at most the {gke.node_count} node(s) the GKE pool gives, "
            "since anti-affinity is required",
        )
    _check_resources("rabbitmq.resources", rmq.resources)
    _check_rabbitmq_memory(rmq, config.production)

    if workers.replicas < 1:
        raise ConfigError(_key("workers.replicas"), workers.replicas, "an integer >= 1")
    if workers.concurrency < 1:
        raise ConfigError(_key("workers.concurrency"), workers.concurrency, "an integer >= 1")
    if workers.longest_task_seconds < 1:
        raise ConfigError(
            _key("workers.longestTaskSeconds"), workers.longest_task_seconds, "an integer >= 1"
        )
    if workers.image:
        _check_image("workers.image", workers.image)
    elif config.target != "gke":
        raise ConfigError(
            _key("workers.image"),
            workers.image,
            "a prebuilt image reference when target is 'existing' "
            "(the image is built only for GKE)",
        )
    _check_resources("workers.resources", workers.resources)
    if workers.scheduler.tasks < 1:
        raise ConfigError(
            _key("workers.scheduler.tasks"), workers.scheduler.tasks, "an integer >= 1"
        )
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,63}", workers.scheduler.run_id):
        raise ConfigError(
            _key("workers.scheduler.runId"),
            workers.scheduler.run_id,
            "1-63 letters, digits, '.', '_' or '-' (change it to enqueue the tasks again)",
        )
    if not MIN_PUBLISH_WINDOW <= workers.scheduler.publish_window <= MAX_PUBLISH_WINDOW:
        raise ConfigError(
            _key("workers.scheduler.publishWindow"),
            workers.scheduler.publish_window,
            f"an integer from {MIN_PUBLISH_WINDOW} to {MAX_PUBLISH_WINDOW}",
        )
    if workers.scheduler.task_seconds < 0:
        raise ConfigError(
            _key("workers.scheduler.taskSeconds"), workers.scheduler.task_seconds, "a number >= 0"
        )
    if config.production:
        for path, res in (
            ("rabbitmq.resources", rmq.resources),
            ("workers.resources", workers.resources),
        ):
            if res.cpu_limit is None or res.memory_limit is None:
                raise ConfigError(
                    _key(path),
                    dataclasses.asdict(res),
                    "cpuLimit and memoryLimit set in a production stack",
                )


def read_pulumi_config() -> dict[str, Any]:
    """Every config key the Pulumi engine handed to this program, flat."""
    from pulumi.runtime import config as runtime_config

    raw: dict[str, Any] = dict(runtime_config.get_config_env())
    raw.update(runtime_config.CONFIG.get())
    return raw


def load() -> StackConfig:
    import pulumi

    return load_stack_config(read_pulumi_config(), pulumi.get_stack())
