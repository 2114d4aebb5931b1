"""The policy pack's rules as pure functions: (resource type, props) -> violation messages.

No Pulumi import here: `policy/__main__.py` wraps each function in a pulumi-policy
policy, and the tests call them directly, on hand-made resources and on every
resource `make plan` rendered. An empty list means the resource complies.

``props`` are the resource's inputs with camelCase keys, as the engine hands them
to a policy (plain dicts and lists, or pulumi-policy's read-only proxies: only
the ``Mapping``/``Sequence`` interfaces are used). A secret reaches a policy as
its plain value; ``make plan`` writes ``[secret]`` instead, which no rule
mistakes for a credential.

Which stack is production: the stack name in the resource's URN
(``urn:pulumi:<stack>::...``), set by the engine, not by the program, compared
with the pack's ``productionStacks`` config (default: prod, production).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

DEFAULT_PRODUCTION_STACKS = ("prod", "production")

STATEFULSET = "kubernetes:apps/v1:StatefulSet"
SERVICE = "kubernetes:core/v1:Service"
CONFIG_MAP = "kubernetes:core/v1:ConfigMap"
SECRET = "kubernetes:core/v1:Secret"
PDB = "kubernetes:policy/v1:PodDisruptionBudget"
GKE_CLUSTER = "gcp:container/cluster:Cluster"
INGRESS_TYPES = (
    "kubernetes:networking.k8s.io/v1:Ingress",
    "kubernetes:networking.k8s.io/v1beta1:Ingress",
    "kubernetes:extensions/v1beta1:Ingress",
)
# Kinds whose pods the workload rules look into: path to the pod spec.
POD_SPEC_PATHS: dict[str, tuple[str, ...]] = {
    "kubernetes:core/v1:Pod": ("spec",),
    "kubernetes:apps/v1:Deployment": ("spec", "template", "spec"),
    "kubernetes:apps/v1:StatefulSet": ("spec", "template", "spec"),
    "kubernetes:apps/v1:DaemonSet": ("spec", "template", "spec"),
    "kubernetes:apps/v1:ReplicaSet": ("spec", "template", "spec"),
    "kubernetes:batch/v1:Job": ("spec", "template", "spec"),
    "kubernetes:batch/v1:CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}
# Workloads that must be covered by a PodDisruptionBudget.
PDB_WORKLOADS = ("kubernetes:apps/v1:Deployment", "kubernetes:apps/v1:StatefulSet")

MANAGEMENT_PORT = 15672
MANAGEMENT_PORT_NAMES = ("management", "http-management", "management-tls")
COOKIE_ENV = "RABBITMQ_ERLANG_COOKIE"
COOKIE_KEYS = (".erlang.cookie", "erlang.cookie", "erlang-cookie", "erlangCookie")
# The article's cookie (and RabbitMQ docs' placeholders): a cookie in a repository
# is known to everyone who can read it.
KNOWN_COOKIES = ("changethis",)
_GUEST_CONF = re.compile(r"^\s*default_(user|pass)\s*=\s*guest\s*$", re.MULTILINE)


# --- small helpers -----------------------------------------------------------


def _get(value: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _maps(value: Any) -> list[Mapping[str, Any]]:
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [v for v in value if isinstance(v, Mapping)]
    return []


def stack_of(urn: str) -> str:
    """``urn:pulumi:<stack>::<project>::<type>::<name>`` -> stack."""
    parts = urn.split("::")
    return parts[0].removeprefix("urn:pulumi:") if parts and parts[0].startswith("urn:") else ""


def is_production(urn: str, production_stacks: Iterable[str] = DEFAULT_PRODUCTION_STACKS) -> bool:
    return stack_of(urn) in set(production_stacks)


def _name(props: Mapping[str, Any]) -> str:
    meta = _get(props, "metadata") or {}
    ns, name = meta.get("namespace"), meta.get("name")
    return f"{ns}/{name}" if ns else str(name)


def pod_spec(resource_type: str, props: Mapping[str, Any]) -> Mapping[str, Any] | None:
    path = POD_SPEC_PATHS.get(resource_type)
    spec = _get(props, *path) if path else None
    return spec if isinstance(spec, Mapping) else None


def containers(spec: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    for key in ("initContainers", "containers"):
        yield from _maps(spec.get(key))


def _image_name(image: Any) -> str:
    """docker.io/library/rabbitmq:4.1-management@sha256:... -> rabbitmq."""
    if not isinstance(image, str):
        return ""
    path = image.split("@")[0].rsplit("/", 1)[-1]
    return path.split(":")[0]


def is_rabbitmq_statefulset(resource_type: str, props: Mapping[str, Any]) -> bool:
    """A StatefulSet running the RabbitMQ image (whatever its labels say)."""
    spec = pod_spec(resource_type, props)
    if resource_type != STATEFULSET or spec is None:
        return False
    return any(_image_name(c.get("image")) == "rabbitmq" for c in _maps(spec.get("containers")))


# --- RabbitMQ ----------------------------------------------------------------


def rabbitmq_statefulset_ha(
    resource_type: str, props: Mapping[str, Any], *, production: bool
) -> list[str]:
    """Pod anti-affinity (required in production) and a volume claim per pod."""
    if not is_rabbitmq_statefulset(resource_type, props):
        return []
    found = []
    spec = pod_spec(resource_type, props) or {}
    anti = _get(spec, "affinity", "podAntiAffinity") or {}
    required = _maps(anti.get("requiredDuringSchedulingIgnoredDuringExecution"))
    preferred = _maps(anti.get("preferredDuringSchedulingIgnoredDuringExecution"))
    if not required and not preferred:
        found.append(
            f"StatefulSet {_name(props)}: no pod anti-affinity, so two RabbitMQ nodes can "
            "share a machine and one machine failure takes a majority"
        )
    elif production and not required:
        found.append(
            f"StatefulSet {_name(props)}: production needs *required* pod anti-affinity "
            "(preferred lets the scheduler put two nodes on one machine)"
        )
    if not _maps(_get(props, "spec", "volumeClaimTemplates")):
        found.append(
            f"StatefulSet {_name(props)}: no volumeClaimTemplates, so a restarted node "
            "loses its messages and its cluster membership"
        )
    return found


def rabbitmq_replicas(
    resource_type: str, props: Mapping[str, Any], *, production: bool
) -> list[str]:
    """An odd number >= 3 in production: quorum queues need a strict majority."""
    if not production or not is_rabbitmq_statefulset(resource_type, props):
        return []
    replicas = _get(props, "spec", "replicas")
    replicas = 1 if replicas is None else replicas  # the Kubernetes default
    if not isinstance(replicas, int | float) or replicas < 3 or int(replicas) % 2 == 0:
        return [
            f"StatefulSet {_name(props)}: replicas = {replicas}; production needs an odd "
            "number >= 3 (quorum queues and pause_minority need a strict majority to "
            "survive losing a node)"
        ]
    return []


def _texts(resource_type: str, props: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, text) of every configuration value a ConfigMap or Secret carries."""
    if resource_type == CONFIG_MAP:
        for key, value in (_get(props, "data") or {}).items():
            yield f"data.{key}", str(value)
    elif resource_type == SECRET:
        for key, value in (_get(props, "stringData") or {}).items():
            yield f"stringData.{key}", str(value)
        for key, value in (_get(props, "data") or {}).items():
            try:
                yield f"data.{key}", base64.b64decode(str(value), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError, ValueError):
                continue  # not base64 text ([secret] in a plan): nothing to read


def _guest_users(text: str) -> bool:
    if _GUEST_CONF.search(text):
        return True
    try:
        document = json.loads(text)
    except ValueError:
        return False
    users = document.get("users") if isinstance(document, Mapping) else None
    return any(u.get("name") == "guest" for u in _maps(users))


def _env(container: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    yield from _maps(container.get("env"))


def rabbitmq_credentials(resource_type: str, props: Mapping[str, Any]) -> list[str]:
    """No guest user, no literal or well-known Erlang cookie; the cookie from a Secret."""
    found = []
    for where, text in _texts(resource_type, props):
        if _guest_users(text):
            found.append(f"{resource_type.split(':')[-1]} {_name(props)} {where}: a guest user")
        if any(c in text.lower() for c in KNOWN_COOKIES):
            found.append(
                f"{resource_type.split(':')[-1]} {_name(props)} {where}: a well-known "
                "Erlang cookie (changeThis): anyone can join or control the cluster"
            )
    if resource_type == CONFIG_MAP:
        for key in _get(props, "data") or {}:
            if key in COOKIE_KEYS:
                found.append(
                    f"ConfigMap {_name(props)}: holds an Erlang cookie ({key}); "
                    "it belongs in a Secret"
                )
    spec = pod_spec(resource_type, props)
    if spec is None:
        return found
    for container in containers(spec):
        for env in _env(container):
            name, value = env.get("name"), env.get("value")
            if name == COOKIE_ENV and value is not None:
                found.append(
                    f"{_name(props)} container {container.get('name')}: {COOKIE_ENV} is a "
                    "literal; take the cookie from a Secret"
                )
            if name == "RABBITMQ_DEFAULT_USER" and value == "guest":
                found.append(f"{_name(props)} container {container.get('name')}: the guest user")
            if isinstance(value, str) and any(c in value.lower() for c in KNOWN_COOKIES):
                found.append(
                    f"{_name(props)} container {container.get('name')}: env {name} holds a "
                    "well-known Erlang cookie (changeThis)"
                )
    if is_rabbitmq_statefulset(resource_type, props) and not _cookie_from_secret(spec):
        found.append(
            f"StatefulSet {_name(props)}: the Erlang cookie does not come from a Secret "
            f"(a secret volume with {COOKIE_KEYS[0]}, or {COOKIE_ENV} from a secretKeyRef)"
        )
    return found


def _cookie_from_secret(spec: Mapping[str, Any]) -> bool:
    for volume in _maps(spec.get("volumes")):
        secret = volume.get("secret")
        if isinstance(secret, Mapping):
            items = _maps(secret.get("items"))
            if not items or any(i.get("key") in COOKIE_KEYS for i in items):
                return True
    return any(
        env.get("name") == COOKIE_ENV and _get(env, "valueFrom", "secretKeyRef") is not None
        for c in containers(spec)
        for env in _env(c)
    )


# --- exposure ------------------------------------------------------------------


def _is_management_port(port: Any) -> bool:
    return port == MANAGEMENT_PORT or port in MANAGEMENT_PORT_NAMES or port == str(MANAGEMENT_PORT)


def management_ui_not_exposed(resource_type: str, props: Mapping[str, Any]) -> list[str]:
    """15672 only inside the cluster (reach it with kubectl port-forward)."""
    if resource_type == SERVICE:
        spec = _get(props, "spec") or {}
        exposed = spec.get("type") in ("LoadBalancer", "NodePort") or bool(spec.get("externalIPs"))
        if exposed and any(
            _is_management_port(p.get(k))
            for p in _maps(spec.get("ports"))
            for k in ("port", "targetPort", "name")
        ):
            return [
                f"Service {_name(props)}: the RabbitMQ management UI ({MANAGEMENT_PORT}) is "
                f"exposed through a {spec.get('type') or 'Service with externalIPs'}"
            ]
    if resource_type in INGRESS_TYPES:
        backends = [_get(props, "spec", "defaultBackend"), _get(props, "spec", "backend")]
        for rule in _maps(_get(props, "spec", "rules")):
            backends += [p.get("backend") for p in _maps(_get(rule, "http", "paths"))]
        for backend in backends:
            ports = [
                _get(backend, "service", "port", "number"),
                _get(backend, "service", "port", "name"),
                _get(backend, "servicePort"),
            ]
            if any(_is_management_port(p) for p in ports):
                return [
                    f"Ingress {_name(props)}: routes to the RabbitMQ management UI "
                    f"({MANAGEMENT_PORT})"
                ]
    return []


# --- every container -------------------------------------------------------------


def _non_root(pod: Mapping[str, Any], container: Mapping[str, Any]) -> bool:
    """The container's own settings win over the pod's."""
    for context in (container.get("securityContext"), pod.get("securityContext")):
        if not isinstance(context, Mapping):
            continue
        user = context.get("runAsUser")
        if user is not None:
            return bool(user != 0) and context.get("runAsNonRoot") is not False
        if context.get("runAsNonRoot") is not None:
            return context.get("runAsNonRoot") is True
    return False


def containers_hardened(resource_type: str, props: Mapping[str, Any]) -> list[str]:
    """Every container (init containers too) requests CPU and memory and runs as non-root."""
    spec = pod_spec(resource_type, props)
    if spec is None:
        return []
    found = []
    for container in containers(spec):
        where = f"{_name(props)} container {container.get('name')}"
        requests = _get(container, "resources", "requests") or {}
        missing = [r for r in ("cpu", "memory") if not requests.get(r)]
        if missing:
            found.append(
                f"{where}: no {' or '.join(missing)} request (the scheduler cannot place it "
                "safely, and it is the first evicted under pressure)"
            )
        if not _non_root(spec, container):
            found.append(
                f"{where}: may run as root (set runAsNonRoot: true, or a runAsUser other "
                "than 0, on the container or the pod)"
            )
    return found


# --- GKE ----------------------------------------------------------------------------


def gke_deletion_protection(
    resource_type: str, props: Mapping[str, Any], *, production: bool
) -> list[str]:
    """A production cluster cannot be deleted by one command.

    pulumi-gcp defaults ``deletionProtection`` to true: only an explicit false fails.
    """
    if not production or resource_type != GKE_CLUSTER:
        return []
    if props.get("deletionProtection") is False:
        return [
            f"GKE cluster {props.get('name') or ''}: deletionProtection is false in a "
            "production stack"
        ]
    return []


# --- the stack as a whole ------------------------------------------------------------


def _selects(selector: Any, labels: Any) -> bool:
    if not isinstance(selector, Mapping) or not isinstance(labels, Mapping):
        return False
    match = selector.get("matchLabels") or {}
    expressions = _maps(selector.get("matchExpressions"))
    if not match and not expressions:
        return False  # an empty PDB selector is a mistake, not "every pod"
    if any(labels.get(k) != v for k, v in match.items()):
        return False
    for e in expressions:
        key, op, values = e.get("key"), e.get("operator"), list(e.get("values") or [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def pod_disruption_budgets(resources: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
    """Every Deployment and StatefulSet (RabbitMQ's, the workers') is covered by a PDB.

    Covered: a PodDisruptionBudget in the same namespace whose selector matches the
    pod template's labels. Without one, a node drain or upgrade may take down a
    RabbitMQ majority or every worker at once.
    """
    budgets = [
        (_get(props, "metadata", "namespace"), _get(props, "spec", "selector"))
        for type_, props in resources
        if type_ == PDB
    ]
    found = []
    for type_, props in resources:
        if type_ not in PDB_WORKLOADS:
            continue
        namespace = _get(props, "metadata", "namespace")
        labels = _get(props, "spec", "template", "metadata", "labels")
        if not any(ns == namespace and _selects(sel, labels) for ns, sel in budgets):
            found.append(
                f"{type_.split(':')[-1]} {_name(props)}: no PodDisruptionBudget selects its pods"
            )
    return found
