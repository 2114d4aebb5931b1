"""The one renderer of RabbitMQ configuration for this project.

Pure functions, no Pulumi import: the text returned here is shipped to Kubernetes
(ConfigMap / Secret) *and* mounted, byte for byte, into the pod twin's RabbitMQ pods
(``localcluster.twin``) that ``make local``, ``make bench`` and the integration tests
boot, so what the tests prove is what the cluster runs.

Design notes (the "why" behind every key):

* ``cluster_partition_handling = pause_minority`` (RabbitMQ 3.x up to 4.2): the
  default ``ignore`` lets both sides of a network partition keep accepting and
  delivering messages ("split brain"; the article's main point).  With
  ``pause_minority`` the node(s) on the minority side stop serving clients until the
  partition heals, which is what a 3-node cluster wants.  RabbitMQ 4.3 removed
  Mnesia, and with it this key: metadata lives in Khepri (Raft) and quorum queues
  are Raft too, so the majority rule is built in.  An unknown key stops a node from
  booting, so the key is rendered only for versions that know it.
* Peer discovery is the *only* difference between the Kubernetes and the local
  rendering.  Kubernetes uses ``rabbit_peer_discovery_k8s``: before 4.1 the plugin
  lists the Endpoints of the headless Service through the API server (needs the
  ``cluster_formation.k8s.*`` keys below and RBAC: ``get`` on endpoints, ``create``
  on events).  From 4.1 the plugin was rewritten: the pod with the lowest StatefulSet
  ordinal (``-0``) is the seed and every other pod joins it; it makes no API call and
  the old ``cluster_formation.k8s.host/address_type/hostname_suffix/service_name``
  keys are accepted but ignored (with deprecation warnings), so they are not rendered
  for 4.1+.  Locally, ``classic_config`` lists the node names.
  ``cluster_formation.target_cluster_size_hint`` matters beyond a hint: a node
  importing definitions at boot skips the queues and bindings while fewer nodes
  than that are up ("There are fewer than target cluster size (3) nodes online,
  skipping queue and binding import from definitions", seen on 3.10.8), so the
  last node to join declares the dead-letter quorum queue with all replicas.
* No ``guest`` user at all: ``guest`` only exists because it is the *default* value
  of ``default_user``; setting ``default_user`` to the app user (see
  :func:`default_user_conf`, kept in a Secret) means ``guest`` is never created.
  ``loopback_users.guest = false`` (the article's ``loopback_users, []``) is
  deliberately absent.  Caveat, verified on 3.10.8: a blank node that imports
  definitions at boot does not seed ``default_user`` at all, so when
  ``definitions_path`` is used the user must be in the definitions document too
  (``definitions_json(..., username=, password=)``, which then belongs in a Secret).
* Quorum queues replace the article's ``ha-all`` mirrored-queue policy (classic
  mirroring was removed in 4.0).  :func:`definitions_json` declares a policy with a
  ``delivery-limit`` and a dead-letter exchange so a poison task cannot be
  redelivered forever (3.x quorum queues have no default limit; 4.0+ default 20
  and then *drop* the message when no dead-letter target is configured).
* No health check key / ``node_health_check``: that CLI command has been a no-op
  since 3.13; probes belong to the StatefulSet (TCP 5672 readiness, management
  health endpoints), not to this file.
* ``log.console = true`` / ``log.file = false``: one log stream, on stdout, which
  is what ``kubectl logs`` reads and what the local harness captures to a file.
* ``total_memory_available_override_value``: RabbitMQ (4.x too) sizes its memory
  watermark from the machine's ``/proc/meminfo``, not from the container's cgroup
  limit, so a 4Gi pod on a 16 GB node would be OOM-killed long before its memory
  alarm blocks publishers.  Given the container's memory limit, the renderer
  states the memory available as that limit minus the Erlang VM's headroom (20 %,
  at most 2 GiB: the Cluster Operator's rule), see :func:`memory_available`.
* ``auth_mechanisms``: only PLAIN and AMQPLAIN (user name and password).  4.x
  enables ANONYMOUS by default; nothing here should ever log in without a password.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass

__all__ = [
    "MIN_SUPPORTED_VERSION",
    "KubernetesDiscovery",
    "LocalDiscovery",
    "default_user_conf",
    "definitions_json",
    "enabled_plugins",
    "memory_available",
    "needs_kubernetes_api",
    "parse_version",
    "rabbitmq_conf",
    "rabbitmq_password_hash",
    "supports_partition_handling",
    "supports_queue_type_policies",
]

#: Oldest release this renderer targets: quorum queues, ``target_cluster_size_hint``
#: and the ``definitions.*`` keys all exist from here on.
MIN_SUPPORTED_VERSION = (3, 8, 0)

#: First release without Mnesia and hence without ``cluster_partition_handling``.
_NO_PARTITION_HANDLING_FROM = (4, 3, 0)
#: First release of the rewritten (seed-node, API-free) Kubernetes peer discovery.
_K8S_DISCOVERY_V2_FROM = (4, 1, 0)
#: First release with quorum-queue continuous membership reconciliation.
_QQ_RECONCILIATION_FROM = (3, 13, 0)
#: First release where a policy can ``apply-to`` one queue type (``quorum_queues``).
_QUEUE_TYPE_POLICIES_FROM = (3, 12, 0)

#: The Erlang VM's headroom above RabbitMQ's own accounting: 20 % of the container's
#: memory limit, at most 2 GiB (as the Cluster Operator's ``removeHeadroom``).
MEMORY_HEADROOM_FRACTION = 0.2
MEMORY_HEADROOM_MAX_BYTES = 2 * 1024**3

# "3.10.8", "4.1.4", "3.13" (image tags), "4.1.4-management",
# "3.10.8-1.1+deb12u1" (Debian), "1:3.10.8-1" (Debian epoch).
_VERSION_RE = re.compile(r"^(?:\d+:)?(\d+)\.(\d+)(?:\.(\d+))?(?:[-+~].*)?$")


@dataclass(frozen=True)
class KubernetesDiscovery:
    """Cluster formation inside Kubernetes: a StatefulSet behind a headless Service."""

    headless_service: str  # e.g. "rabbitmq-nodes"
    namespace: str  # e.g. "rabbitmq"
    cluster_size: int  # StatefulSet replicas

    def __post_init__(self) -> None:
        if self.cluster_size < 1:
            raise ValueError(f"cluster_size must be >= 1, got {self.cluster_size!r}")
        for field, value in (
            ("headless_service", self.headless_service),
            ("namespace", self.namespace),
        ):
            if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", value):
                raise ValueError(f"{field} must be a DNS-1123 label, got {value!r}")


@dataclass(frozen=True)
class LocalDiscovery:
    """Cluster formation from a fixed node list (``classic_config``), e.g. on 127.0.0.1."""

    nodes: tuple[str, ...]  # full node names, e.g. ("rmq0@localhost", "rmq1@localhost")

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ValueError("LocalDiscovery needs at least one node name")
        for node in self.nodes:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+@[A-Za-z0-9_.-]+", node):
                raise ValueError(f"not a full Erlang node name (name@host): {node!r}")
        if len(set(self.nodes)) != len(self.nodes):
            raise ValueError(f"duplicate node names in {self.nodes!r}")


Discovery = KubernetesDiscovery | LocalDiscovery


def parse_version(version: str) -> tuple[int, int, int]:
    """Parse a RabbitMQ version, image tag or Debian package version.

    >>> parse_version("3.10.8-1.1+deb12u1")
    (3, 10, 8)
    >>> parse_version("4.1.4-management")
    (4, 1, 4)
    """
    if not isinstance(version, str):
        raise ValueError(f"RabbitMQ version must be a string like '3.13.7', got {version!r}")
    match = _VERSION_RE.match(version.strip())
    if match is None:
        raise ValueError(
            f"cannot parse RabbitMQ version {version!r}: expected MAJOR.MINOR[.PATCH], "
            "optionally followed by -suffix or +suffix (e.g. '4.1.4-management')"
        )
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def _checked_version(version: str) -> tuple[int, int, int]:
    parsed = parse_version(version)
    if parsed < MIN_SUPPORTED_VERSION:
        raise ValueError(
            f"RabbitMQ version {version!r} is older than "
            f"{'.'.join(map(str, MIN_SUPPORTED_VERSION))}, which this renderer does not support"
        )
    return parsed


def supports_partition_handling(version: str) -> bool:
    """True when ``cluster_partition_handling`` is a valid key (3.x up to 4.2).

    RabbitMQ 4.3 dropped Mnesia for Khepri (Raft) and the key with it; rendering it
    there stops the node from booting.
    """
    return parse_version(version) < _NO_PARTITION_HANDLING_FROM


def needs_kubernetes_api(version: str) -> bool:
    """True when Kubernetes peer discovery calls the API server (before 4.1).

    Then the pods need a service-account token and RBAC (``get`` endpoints, ``create``
    events).  From 4.1 the plugin derives the seed node ``<statefulset>-0`` from its
    own node name and makes no API call (verified on 4.3.6), so neither is needed.
    """
    return parse_version(version) < _K8S_DISCOVERY_V2_FROM


def memory_available(container_memory_limit: int) -> int:
    """Bytes RabbitMQ may treat as the machine's memory inside a container limit.

    The limit minus the Erlang VM's headroom: 20 % of it, at most 2 GiB.  RabbitMQ's
    memory watermark (0.6 by default) then applies to this figure.
    """
    if container_memory_limit < 64 * 1024**2:
        raise ValueError(
            f"container_memory_limit must be at least 64 MiB, got {container_memory_limit!r}"
        )
    headroom = min(
        int(container_memory_limit * MEMORY_HEADROOM_FRACTION), MEMORY_HEADROOM_MAX_BYTES
    )
    return container_memory_limit - headroom


def supports_queue_type_policies(version: str) -> bool:
    """True when a policy can ``apply-to: quorum_queues`` (RabbitMQ 3.12+)."""
    return parse_version(version) >= _QUEUE_TYPE_POLICIES_FROM


def _discovery_lines(parsed: tuple[int, int, int], discovery: Discovery) -> list[str]:
    if isinstance(discovery, KubernetesDiscovery):
        lines = [
            "## Peer discovery: Kubernetes (StatefulSet pods behind a headless Service).",
            "cluster_formation.peer_discovery_backend = rabbit_peer_discovery_k8s",
        ]
        if parsed < _K8S_DISCOVERY_V2_FROM:
            # Version 1 of the plugin asks the API server for the Endpoints of the
            # headless Service and turns each endpoint's pod hostname into a node name:
            # rabbit@<pod>.<service>.<namespace> (RABBITMQ_USE_LONGNAME=true).
            lines += [
                "cluster_formation.k8s.host = kubernetes.default",
                "cluster_formation.k8s.address_type = hostname",
                f"cluster_formation.k8s.service_name = {discovery.headless_service}",
                "cluster_formation.k8s.hostname_suffix = "
                f".{discovery.headless_service}.{discovery.namespace}",
            ]
        else:
            lines.append(
                "# 4.1+: the pod with the lowest ordinal seeds the cluster, the others join it;"
                " no API calls, no k8s.* keys needed."
            )
        size = discovery.cluster_size
    else:
        lines = [
            "## Peer discovery: fixed node list (local cluster).",
            "cluster_formation.peer_discovery_backend = classic_config",
        ]
        lines += [
            f"cluster_formation.classic_config.nodes.{i} = {node}"
            for i, node in enumerate(discovery.nodes, start=1)
        ]
        size = len(discovery.nodes)
    lines.append(f"cluster_formation.target_cluster_size_hint = {size}")
    return lines


def _cluster_size(discovery: Discovery) -> int:
    if isinstance(discovery, KubernetesDiscovery):
        return discovery.cluster_size
    return len(discovery.nodes)


def rabbitmq_conf(
    version: str,
    discovery: KubernetesDiscovery | LocalDiscovery,
    *,
    amqp_port: int = 5672,
    management_port: int = 15672,
    prometheus_port: int = 15692,
    disk_free_limit: str | int = "2GB",
    container_memory_limit: int | None = None,
    definitions_path: str | None = None,
    net_ticktime: int | None = None,
) -> str:
    """Render ``rabbitmq.conf`` (new-style, sysctl format) for one RabbitMQ version.

    ``net_ticktime``: seconds until the other nodes declare a silent node down
    (None: RabbitMQ's default, 60).

    Only the peer-discovery section depends on ``discovery``; everything else is
    identical for Kubernetes and for the local test cluster.  The default user is not
    in here (it is a secret): see :func:`default_user_conf`.
    """
    parsed = _checked_version(version)
    for name, port in (
        ("amqp_port", amqp_port),
        ("management_port", management_port),
        ("prometheus_port", prometheus_port),
    ):
        if not 0 < port < 65536:
            raise ValueError(f"{name} must be a TCP port (1-65535), got {port!r}")
    if len({amqp_port, management_port, prometheus_port}) != 3:
        raise ValueError(
            f"ports must differ: amqp={amqp_port}, management={management_port}, "
            f"prometheus={prometheus_port}"
        )
    if isinstance(disk_free_limit, bool) or not (
        (isinstance(disk_free_limit, int) and disk_free_limit > 0)
        or (
            isinstance(disk_free_limit, str)
            and re.fullmatch(r"\d+(\.\d+)?([kKmMgGtT][bB]?|[kKmMgG][iI][bB])?", disk_free_limit)
        )
    ):
        raise ValueError(
            "disk_free_limit must look like '2GB' or '500MB', or be a positive number of "
            f"bytes, got {disk_free_limit!r}"
        )
    if net_ticktime is not None and (isinstance(net_ticktime, bool) or net_ticktime < 1):
        raise ValueError(f"net_ticktime must be a positive number of seconds, got {net_ticktime!r}")
    memory_lines = []
    if container_memory_limit is not None:
        memory_lines = [
            "## Memory: the container's limit, not the node's /proc/meminfo, less the",
            "## Erlang VM's headroom; the memory alarm (watermark 0.6) fires within it.",
            f"total_memory_available_override_value = {memory_available(container_memory_limit)}",
        ]
    if definitions_path is not None and (
        not definitions_path.startswith("/") or "\n" in definitions_path
    ):
        raise ValueError(f"definitions_path must be an absolute path, got {definitions_path!r}")

    version_text = ".".join(map(str, parsed))
    lines = [
        f"# Rendered by components/rabbitmq_conf.py for RabbitMQ {version_text}: do not edit.",
        "",
        "## Listeners",
        f"listeners.tcp.default = {amqp_port}",
        f"management.tcp.port = {management_port}",
        f"prometheus.tcp.port = {prometheus_port}",
        "",
        "## Logging: one stream, on stdout (kubectl logs; captured to a file locally).",
        "log.console = true",
        "log.console.level = info",
        "log.file = false",
        "",
        "## Resources: block publishers before the disk fills up.",
        f"disk_free_limit.absolute = {disk_free_limit}",
        *memory_lines,
        "",
        "## Authentication: a user's credentials only (4.x enables ANONYMOUS by default).",
        "auth_mechanisms.1 = PLAIN",
        "auth_mechanisms.2 = AMQPLAIN",
        "",
    ]
    if net_ticktime is not None:
        lines += [
            "## A node that vanishes silently is declared down after ~this many seconds;",
            "## until then quorum-queue clients on the other nodes wait for it.",
            f"net_ticktime = {net_ticktime}",
            "",
        ]
    if parsed < _NO_PARTITION_HANDLING_FROM:
        lines += [
            "## Network partitions: the minority side pauses instead of serving a split brain.",
            "cluster_partition_handling = pause_minority",
            "",
        ]
    else:
        lines += [
            "## Network partitions: 4.3+ stores metadata in Khepri (Raft); the majority rule",
            "## is built in and cluster_partition_handling no longer exists.",
            "",
        ]
    lines += [*_discovery_lines(parsed, discovery), ""]
    if parsed >= _QQ_RECONCILIATION_FROM:
        lines += [
            "## Quorum queues declared before every node joined (e.g. at boot from the",
            "## definitions) grow to the cluster size on their own.",
            "quorum_queue.continuous_membership_reconciliation.enabled = true",
            "quorum_queue.continuous_membership_reconciliation.target_group_size = "
            f"{_cluster_size(discovery)}",
            "quorum_queue.continuous_membership_reconciliation.auto_remove = false",
            "",
        ]
    if definitions_path is not None:
        lines += [
            "## Vhost, policy and dead-letter topology, imported at every boot.",
            "definitions.import_backend = local_filesystem",
            f"definitions.local.path = {definitions_path}",
            "",
        ]
    return "\n".join(lines).rstrip("\n") + "\n"


def enabled_plugins(discovery: KubernetesDiscovery | LocalDiscovery) -> str:
    """The ``enabled_plugins`` file (an Erlang term) for this discovery mode."""
    plugins = ["rabbitmq_management", "rabbitmq_prometheus"]
    if isinstance(discovery, KubernetesDiscovery):
        plugins.append("rabbitmq_peer_discovery_k8s")
    return f"[{','.join(plugins)}].\n"


def _conf_value(name: str, value: str) -> str:
    # rabbitmq.conf values run to the end of the line and '#' starts a comment
    # anywhere, surrounding whitespace is trimmed: refuse what cannot round-trip.
    if not value or value != value.strip() or any(c in value for c in "#\n\r"):
        raise ValueError(
            f"{name} cannot be written to rabbitmq.conf: it must be non-empty and contain "
            "no '#', newline or leading/trailing whitespace"
        )
    return value


def default_user_conf(username: str, password: str, vhost: str) -> str:
    """conf.d snippet with the application user (kept in a Secret, not the ConfigMap).

    With ``default_user`` set, ``guest`` (only the *default* default_user) is never
    created.  The user gets full permissions on its vhost and the ``management`` tag
    (read access to its own vhost through the HTTP API, e.g. for KEDA's queue-length
    scaler), not ``administrator``.
    """
    lines = [
        "# Application user: replaces guest, which therefore never exists.",
        f"default_user = {_conf_value('username', username)}",
        f"default_pass = {_conf_value('password', password)}",
        f"default_vhost = {_conf_value('vhost', vhost)}",
        "default_permissions.configure = .*",
        "default_permissions.read = .*",
        "default_permissions.write = .*",
        "default_user_tags.management = true",
    ]
    return "\n".join(lines) + "\n"


def rabbitmq_password_hash(password: str, *, salt: bytes | None = None) -> str:
    """``password_hash`` as RabbitMQ stores it (``rabbit_password_hashing_sha256``).

    ``base64(salt + sha256(salt + utf8(password)))`` with a 4-byte salt.  By default
    the salt is derived from the password, so rendering twice gives the same text (no
    perpetual diff in a Secret, no needless rolling restart); pass ``salt`` to choose.
    """
    if salt is None:
        salt = hashlib.sha256(b"rabbitmq_conf.py salt\0" + password.encode()).digest()[:4]
    if len(salt) != 4:
        raise ValueError(f"salt must be 4 bytes, got {len(salt)}")
    digest = hashlib.sha256(salt + password.encode()).digest()
    return base64.b64encode(salt + digest).decode("ascii")


def _pcre_escape(text: str) -> str:
    return re.sub(r"([\\.^$|?*+()\[\]{}])", r"\\\1", text)


#: Where a task that keeps crashing its worker ends up (the monitoring alerts on it).
DEAD_LETTER_EXCHANGE = "dlx"
DEAD_LETTER_QUEUE = "dead-letter"


def definitions_json(
    vhost: str,
    *,
    delivery_limit: int,
    dead_letter_exchange: str = DEAD_LETTER_EXCHANGE,
    dead_letter_queue: str = DEAD_LETTER_QUEUE,
    username: str | None = None,
    password: str | None = None,
    version: str | None = None,
    monitor: tuple[str, str] | None = None,
) -> str:
    """A RabbitMQ definitions document, imported at boot (``definitions.local.path``).

    Declares the vhost, a fanout dead-letter exchange, a quorum dead-letter queue
    bound to it, and a policy giving quorum queues a ``delivery-limit`` and that
    ``dead-letter-exchange``: a task that keeps crashing its worker is dead-lettered
    after ``delivery_limit`` redeliveries instead of looping forever.  This replaces
    the article's ``ha-all`` (``ha-mode: all``) mirroring policy.

    **Users.** A blank node that has definitions to import at boot does *not* seed
    ``default_user`` (its log says "Will not seed default virtual host and user: have
    definitions to load"; verified on 3.10.8, same code path in 3.13 and 4.x): the
    application user must be in this document, or the cluster has no user at all.
    Pass ``username`` and ``password``; the document then contains a salted
    ``password_hash`` and belongs in a Secret, not a ConfigMap.

    ``monitor`` (username, password): a second user that can only read queue
    statistics through the management API (KEDA's scaler): the ``management`` tag, and
    on the vhost an entry whose three permissions match no resource (``""``) - the
    entry grants the vhost's API views, nothing else.

    ``version`` (``None`` = current releases) matters for one thing: from 3.12 the
    policy targets ``quorum_queues`` only.  Older brokers reject that value and only
    know ``queues``, which would also put the dead-letter exchange on Celery's classic
    TTL'd queues (``celeryev.*`` events, ``*.pidbox`` replies) and fill the dead-letter
    queue with expired events, so there the pattern excludes those names.  The
    dead-letter queue itself is always excluded (no dead-letter cycle).
    """
    if delivery_limit < 1:
        raise ValueError(f"delivery_limit must be >= 1, got {delivery_limit!r}")
    for name, value in (
        ("vhost", vhost),
        ("dead_letter_exchange", dead_letter_exchange),
        ("dead_letter_queue", dead_letter_queue),
    ):
        if not value or any(ord(c) < 32 for c in value):
            raise ValueError(f"{name} must be a non-empty printable name, got {value!r}")
    if dead_letter_exchange.startswith("amq."):
        raise ValueError(
            f"dead_letter_exchange cannot use the reserved 'amq.' prefix: {dead_letter_exchange!r}"
        )
    if (username is None) != (password is None):
        raise ValueError("pass both username and password, or neither")
    if monitor is not None and (not all(monitor) or monitor[0] == username):
        raise ValueError(f"monitor must be a new non-empty (username, password), got {monitor!r}")

    exclude = [_pcre_escape(dead_letter_queue) + "$"]
    if version is None or supports_queue_type_policies(version):
        apply_to = "quorum_queues"
    else:
        apply_to = "queues"
        exclude += [r"celeryev\.", r".*\.pidbox$"]
    pattern = f"^(?!{'|'.join(exclude)}).*"

    document: dict[str, list[dict[str, object]]] = {}
    users: list[tuple[str, str, str]] = []  # name, password, the permissions' pattern
    if username is not None and password is not None:
        if not username or not password:
            raise ValueError("username and password must be non-empty")
        users.append((username, password, ".*"))
    if monitor is not None:
        users.append((monitor[0], monitor[1], ""))
    if users:
        document["users"] = [
            {
                "name": name,
                "password_hash": rabbitmq_password_hash(secret),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": ["management"],
            }
            for name, secret, _ in users
        ]
    document["vhosts"] = [{"name": vhost}]
    if users:
        document["permissions"] = [
            {"user": name, "vhost": vhost, "configure": rights, "write": rights, "read": rights}
            for name, _, rights in users
        ]
    document["policies"] = [
        {
            "vhost": vhost,
            "name": "quorum-delivery-limit",
            "pattern": pattern,
            "apply-to": apply_to,
            "priority": 0,
            "definition": {
                "delivery-limit": delivery_limit,
                "dead-letter-exchange": dead_letter_exchange,
            },
        }
    ]
    document["exchanges"] = [
        {
            "name": dead_letter_exchange,
            "vhost": vhost,
            "type": "fanout",
            "durable": True,
            "auto_delete": False,
            "internal": False,
            "arguments": {},
        }
    ]
    document["queues"] = [
        {
            "name": dead_letter_queue,
            "vhost": vhost,
            "durable": True,
            "auto_delete": False,
            "arguments": {"x-queue-type": "quorum"},
        }
    ]
    document["bindings"] = [
        {
            "source": dead_letter_exchange,
            "vhost": vhost,
            "destination": dead_letter_queue,
            "destination_type": "queue",
            "routing_key": "",
            "arguments": {},
        }
    ]
    return json.dumps(document, indent=2) + "\n"
