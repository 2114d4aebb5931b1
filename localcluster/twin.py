"""The pod twin: a stack's own rendered Kubernetes objects, as pods on this machine.

The objects come from the program itself (``tools.mockrun.run_program``, what
``make plan`` writes), with freshly generated secrets: change the StatefulSet
and the twin changes with it. :func:`stateful_set_pods` and
:func:`deployment_pod` turn a manifest into :class:`~localcluster.pods.PodSpec`
objects. What cannot exist here is adapted, each adaptation in ONE place and
listed in :data:`ADAPTATIONS` (a run's report carries that list).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import re
import secrets
import signal
import string
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.config import load_stack_config, quantity_bytes
from components.rabbitmq_conf import needs_kubernetes_api, parse_version
from localcluster import podnet, pods
from localcluster.pods import CONTAINER_PATH, ContainerSpec, Mount, PodSpec, Probe
from localcluster.sockets import established_endpoints
from tools.mockrun import reveal, run_program, stack_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_DOMAIN = "cluster.local"
RUNS_DIR = Path("/var/tmp/localcluster")
# "<pid> <start time>" of the process that owns a run (pid reuse cannot fool it).
OWNER_FILE = "owner"
# The official RabbitMQ image's ENV, with its /opt/rabbitmq/sbin as the Debian
# root's /usr/lib/rabbitmq/bin (RabbitMQ's own scripts, not Debian's wrappers).
RABBITMQ_IMAGE_ENV = {
    "PATH": f"/usr/lib/rabbitmq/bin:{CONTAINER_PATH}",
    "HOME": "/var/lib/rabbitmq",
    "LANG": "C.UTF-8",
}

#: Everything the twin changes on the way from a manifest to a pod, and why.
ADAPTATIONS = {
    "image": "the RabbitMQ image is a Debian root filesystem with the same RabbitMQ "
    "major.minor (localcluster.rootfs); the Celery image is this checkout's virtualenv "
    "and app/ (PATH and PYTHONPATH point there), run on this machine's own root",
    "image command and env": "a container without `command` runs its image's default "
    "(`rabbitmq-server`), with the official image's ENV: HOME=/var/lib/rabbitmq and "
    "RabbitMQ's own scripts first on PATH (/usr/lib/rabbitmq/bin in the Debian root: "
    "Debian's /usr/sbin wrappers log to a file and do not exec, the image's scripts do)",
    "image user": "the official RabbitMQ image's user is uid/gid 999; the Debian root's "
    "`rabbitmq` user is renumbered to the pod's runAsUser in the pod's /etc/passwd",
    "PersistentVolumeClaim": "a directory per pod and claim that outlives the pod",
    "Service DNS": "an /etc/hosts in every pod (the Celery pods' with their own name, as "
    "the kubelet writes it) with each StatefulSet pod's "
    "<pod>.<service>.<namespace> and ...svc.cluster.local names",
    "secrets": "generated for the run (the program's RandomPassword results), never the "
    "deployed ones",
    "NetworkPolicy": "not enforced (every pod on the bridge reaches every other)",
    "measurement env": "Celery pods may get extra env a run sets to count tasks "
    "(TASK_LEDGER on a shared directory, COUNT_STEP_SECONDS); the manifest's env is kept",
    "measurement args": "the scheduler pod may get extra options a run adds to the Job's "
    "command (--ids-file on a shared directory, --rate, --no-progress)",
    "pod names": "Deployment and Job pods are named <name>-<i>, not <name>-<hash>-<id>",
    "autoscaling": "KEDA does not run: a Deployment a ScaledObject scales (no replica "
    "count of its own) gets the ScaledObject's minReplicaCount pods, which a run sets to "
    "its worker count; the scaler's management-API query is sent to the pods for real "
    "(tests/integration/test_metrics_endpoint.py)",
    # Only for RabbitMQ before 4.1 (make bench's 3.10 side); see adapt_peer_discovery.
    "peer discovery before 4.1": "RabbitMQ < 4.1 only: the Kubernetes plugin's version 1 "
    "lists the headless Service's Endpoints through the Kubernetes API, which does not "
    "exist here, so the rendered rabbitmq.conf's rabbit_peer_discovery_k8s backend and "
    "its cluster_formation.k8s.* keys become classic_config listing the StatefulSet pods' "
    "node names (RABBITMQ_NODENAME of each ordinal); everything else, enabled_plugins "
    "included, as rendered. 4.1+ pods keep the Kubernetes plugin as shipped",
}
#: The ADAPTATIONS entry that applies only to RabbitMQ before 4.1.
PEER_DISCOVERY_ADAPTATION = "peer discovery before 4.1"


class TwinError(RuntimeError):
    pass


def random_secret(name: str, length: int) -> str:
    """A RandomPassword result as pulumi-random makes it (letters and digits)."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


@dataclass(frozen=True)
class RenderedStack:
    """A stack's Kubernetes objects, as the program registers them, secrets revealed."""

    stack: str
    objects: tuple[dict[str, Any], ...]

    @classmethod
    def render(cls, stack: str, overrides: Mapping[str, Any] | None = None) -> RenderedStack:
        """``overrides``: top-level config keys replaced, as `pulumi config set` would."""
        config = {**stack_config(stack), **(overrides or {})}
        run = run_program(config, stack, random_result=random_secret)
        if run.error is not None:
            raise TwinError(f"the program fails for stack {stack!r}: {run.error}")
        return cls(stack, tuple(reveal(m) for _, m in run.kubernetes_objects()))

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.objects if o["kind"] == kind and o["metadata"]["name"] == name]
        if len(found) != 1:
            raise TwinError(f"stack {self.stack}: expected one {kind} {name}, found {len(found)}")
        return found[0]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def data(self, kind: str, name: str, namespace: str) -> dict[str, str]:
        """A ConfigMap's or Secret's contents as the kubelet writes them into files."""
        for o in self.objects:
            meta = o["metadata"]
            if o["kind"] == kind and meta["name"] == name and meta.get("namespace") == namespace:
                if kind == "Secret":
                    decoded = {
                        k: base64.b64decode(v).decode() for k, v in (o.get("data") or {}).items()
                    }
                    return {**decoded, **(o.get("stringData") or {})}
                return dict(o.get("data") or {})
        raise TwinError(f"stack {self.stack}: no {kind} {namespace}/{name}")


def _image_tag_version(image: str) -> str:
    """ "4.3.6" of "rabbitmq:4.3.6-management"."""
    match = re.search(r":(\d+\.\d+\.\d+)", image)
    if match is None:
        raise TwinError(f"no RabbitMQ version in the image {image!r}")
    return match[1]


def image_version(image: str) -> str:
    """ "4.3" of "rabbitmq:4.3.6-management"."""
    major, minor, _ = parse_version(_image_tag_version(image))
    return f"{major}.{minor}"


def pod_dns_names(pod: str, service: str, namespace: str) -> list[str]:
    return [
        f"{pod}.{service}.{namespace}.svc.{CLUSTER_DOMAIN}",
        f"{pod}.{service}.{namespace}.svc",
        f"{pod}.{service}.{namespace}",
        pod,
    ]


def expand(value: str, env: Mapping[str, str]) -> str:
    """``$(VAR)`` as the kubelet expands it: defined names only, ``$$`` escapes."""

    def one(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        return env.get(match[1], match[0])

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, value)


def container_env(
    container: Mapping[str, Any], pod: str, namespace: str, rendered: RenderedStack
) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(item["value"], env)
            continue
        source = item["valueFrom"]
        if "fieldRef" in source:
            field = source["fieldRef"]["fieldPath"]
            values = {"metadata.name": pod, "metadata.namespace": namespace}
            if field not in values:
                raise TwinError(f"{pod}: env {item['name']}: fieldRef {field} is not supported")
            env[item["name"]] = values[field]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[item["name"]] = rendered.data("Secret", ref["name"], namespace)[ref["key"]]
        else:
            raise TwinError(f"{pod}: env {item['name']}: {sorted(source)} is not supported")
    return env


def cpu_millis(quantity: str) -> int:
    return int(quantity[:-1]) if quantity.endswith("m") else int(float(quantity) * 1000)


def _probe(spec: Mapping[str, Any] | None, ports: Mapping[str, int]) -> Probe | None:
    if spec is None:
        return None
    if "exec" in spec:
        command, port = tuple(spec["exec"]["command"]), None
    elif "tcpSocket" in spec:
        named = spec["tcpSocket"]["port"]
        command, port = (), ports[named] if isinstance(named, str) else int(named)
    else:
        raise TwinError(f"probe {sorted(spec)} is not supported")
    return Probe(
        exec=command,
        tcp_port=port,
        initial_delay=float(spec.get("initialDelaySeconds", 0)),
        period=float(spec.get("periodSeconds", 10)),
        timeout=float(spec.get("timeoutSeconds", 1)),
        failure_threshold=int(spec.get("failureThreshold", 3)),
        success_threshold=int(spec.get("successThreshold", 1)),
    )


@dataclass(frozen=True)
class PodFiles:
    """Where one pod's volumes live on this machine."""

    pod_dir: Path  # removed with the pod
    pvc_dir: Path  # kept across the pod's restarts

    def volume(self, name: str) -> Path:
        return self.pod_dir / "volumes" / name

    def claim(self, name: str) -> Path:
        return self.pvc_dir / name


def _write(path: Path, text: str, mode: int, uid: int, gid: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    os.chown(path, uid, gid)


def materialize_volumes(
    pod: Mapping[str, Any],
    pod_name: str,
    namespace: str,
    rendered: RenderedStack,
    files: PodFiles,
    claims: list[str],
) -> dict[str, Path]:
    """Each volume of the pod spec as a directory here, filled as the kubelet fills it."""
    security = pod.get("securityContext", {})
    uid, gid = int(security.get("runAsUser", 0)), int(security.get("fsGroup", 0))
    out: dict[str, Path] = {}
    for volume in pod.get("volumes", []):
        name = volume["name"]
        target = files.volume(name)
        target.mkdir(parents=True, exist_ok=True)
        if "emptyDir" in volume:
            os.chown(target, uid, gid)
            target.chmod(0o2777 if name == "tmp" else 0o2775)
        elif "configMap" in volume or "secret" in volume:
            kind = "ConfigMap" if "configMap" in volume else "Secret"
            source = volume["configMap"] if kind == "ConfigMap" else volume["secret"]
            ref = source["name"] if kind == "ConfigMap" else source["secretName"]
            data = rendered.data(kind, ref, namespace)
            mode = int(source.get("defaultMode", 0o644))
            items = source.get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                _write(target / item["path"], data[item["key"]], mode, 0, gid)
        elif "downwardAPI" in volume:
            for item in volume["downwardAPI"]["items"]:
                # A label the pod does not carry is an empty file.
                _write(target / item["path"], "", 0o644, 0, gid)
        else:
            raise TwinError(f"{pod_name}: volume {name}: {sorted(volume)} is not supported")
        out[name] = target
    for claim in claims:
        path = files.claim(claim)
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, uid, gid)
        out[claim] = path
    return out


def _mounts(container: Mapping[str, Any], volumes: Mapping[str, Path]) -> tuple[Mount, ...]:
    mounts = []
    for m in container.get("volumeMounts", []):
        source = volumes[m["name"]]
        if "subPath" in m:
            source = source / m["subPath"]
        mounts.append(Mount(m["mountPath"], source, bool(m.get("readOnly", False))))
    return tuple(mounts)


def _ids(pod: Mapping[str, Any], container: Mapping[str, Any]) -> tuple[int, int]:
    merged = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    return int(merged.get("runAsUser", 0)), int(merged.get("runAsGroup", 0))


def rabbitmq_passwd(root: Path, uid: int, gid: int, files: PodFiles) -> tuple[Mount, ...]:
    """The root's /etc/passwd and /etc/group with `rabbitmq` as the image's uid/gid."""
    mounts = []
    for name, pattern, replacement in (
        ("passwd", r"^rabbitmq:x:\d+:\d+:", f"rabbitmq:x:{uid}:{gid}:"),
        ("group", r"^rabbitmq:x:\d+:", f"rabbitmq:x:{gid}:"),
    ):
        text = re.sub(pattern, replacement, (root / "etc" / name).read_text(), flags=re.M)
        path = files.pod_dir / "etc" / name
        _write(path, text, 0o644, 0, 0)
        mounts.append(Mount(f"/etc/{name}", path, read_only=True))
    return tuple(mounts)


def _container_spec(
    container: Mapping[str, Any],
    pod: Mapping[str, Any],
    env: Mapping[str, str],
    volumes: Mapping[str, Path],
    extra_mounts: tuple[Mount, ...],
    default_command: tuple[str, ...],
) -> ContainerSpec:
    argv = [*container.get("command", []), *container.get("args", [])] or list(default_command)
    uid, gid = _ids(pod, container)
    return ContainerSpec(
        name=container["name"],
        argv=tuple(expand(a, env) for a in argv),
        env=tuple(env.items()),
        mounts=_mounts(container, volumes) + extra_mounts,
        uid=uid,
        gid=gid,
        read_only_root=bool(container.get("securityContext", {}).get("readOnlyRootFilesystem")),
    )


def _limits(container: Mapping[str, Any]) -> tuple[int | None, int | None]:
    limits = container.get("resources", {}).get("limits", {})
    memory = quantity_bytes(limits["memory"]) if "memory" in limits else None
    cpu = cpu_millis(limits["cpu"]) if "cpu" in limits else None
    return memory, cpu


def adapt_peer_discovery(rendered: RenderedStack, statefulset: Mapping[str, Any]) -> RenderedStack:
    """ADAPTATIONS["peer discovery before 4.1"]: the stack, its rabbitmq.conf switched
    from the Kubernetes plugin to ``classic_config`` when the image is older than 4.1
    (unchanged otherwise). The node names are what each pod's RABBITMQ_NODENAME
    expands to, so the list is the StatefulSet's own."""
    pod = statefulset["spec"]["template"]["spec"]
    (main,) = pod["containers"]
    if not needs_kubernetes_api(_image_tag_version(main["image"])):
        return rendered
    meta = statefulset["metadata"]
    namespace = meta["namespace"]
    nodes = [
        container_env(main, f"{meta['name']}-{i}", namespace, rendered)["RABBITMQ_NODENAME"]
        for i in range(int(statefulset["spec"]["replicas"]))
    ]
    config_maps = {v["configMap"]["name"] for v in pod.get("volumes", []) if "configMap" in v}
    objects = []
    changed = 0
    for obj in rendered.objects:
        data = obj.get("data") or {}
        if (
            obj["kind"] == "ConfigMap"
            and obj["metadata"]["name"] in config_maps
            and obj["metadata"].get("namespace") == namespace
            and "rabbitmq.conf" in data
        ):
            conf = _classic_config_discovery(data["rabbitmq.conf"], nodes)
            obj = {**obj, "data": {**data, "rabbitmq.conf": conf}}
            changed += 1
        objects.append(obj)
    if changed != 1:
        raise TwinError(
            f"stack {rendered.stack}: expected one ConfigMap with rabbitmq.conf mounted by "
            f"StatefulSet {meta['name']}, found {changed}"
        )
    return RenderedStack(rendered.stack, tuple(objects))


K8S_BACKEND_LINE = "cluster_formation.peer_discovery_backend = rabbit_peer_discovery_k8s"


def _classic_config_discovery(conf: str, nodes: Sequence[str]) -> str:
    """``conf`` with the Kubernetes backend line replaced by ``classic_config`` and the
    node list, and the ``cluster_formation.k8s.*`` lines dropped."""
    lines = conf.splitlines(keepends=True)
    backend = [i for i, line in enumerate(lines) if line.strip() == K8S_BACKEND_LINE]
    if len(backend) != 1:
        raise TwinError(
            f"rabbitmq.conf: expected one line {K8S_BACKEND_LINE!r}, found {len(backend)}"
        )
    replacement = [
        "# The twin (RabbitMQ < 4.1, no Kubernetes API here): the StatefulSet's pods, listed.\n",
        "cluster_formation.peer_discovery_backend = classic_config\n",
        *(f"cluster_formation.classic_config.nodes.{i} = {n}\n" for i, n in enumerate(nodes, 1)),
    ]
    out: list[str] = []
    for i, line in enumerate(lines):
        if i == backend[0]:
            out += replacement
        elif not line.startswith("cluster_formation.k8s."):
            out.append(line)
    return "".join(out)


def stateful_set_pod(
    rendered: RenderedStack,
    statefulset: Mapping[str, Any],
    ordinal: int,
    root: Path,
    files: PodFiles,
    hosts: Path,
) -> PodSpec:
    """Pod ``<name>-<ordinal>`` of a RabbitMQ StatefulSet, on the given root filesystem."""
    name = f"{statefulset['metadata']['name']}-{ordinal}"
    namespace = statefulset["metadata"]["namespace"]
    template = statefulset["spec"]["template"]
    pod = template["spec"]
    claims = [c["metadata"]["name"] for c in statefulset["spec"].get("volumeClaimTemplates", [])]
    volumes = materialize_volumes(pod, name, namespace, rendered, files, claims)
    (main,) = pod["containers"]
    uid, gid = _ids(pod, main)
    extra = (Mount("/etc/hosts", hosts, read_only=True), *rabbitmq_passwd(root, uid, gid, files))
    ports = {p["name"]: int(p["containerPort"]) for p in main.get("ports", [])}
    memory, cpu = _limits(main)
    pre_stop = main.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    return PodSpec(
        name=name,
        root=root,
        container=_container_spec(
            main,
            pod,
            {**RABBITMQ_IMAGE_ENV, **container_env(main, name, namespace, rendered)},
            volumes,
            extra,
            ("rabbitmq-server",),
        ),
        init_containers=tuple(
            _container_spec(
                c,
                pod,
                {**RABBITMQ_IMAGE_ENV, **container_env(c, name, namespace, rendered)},
                volumes,
                extra,
                (),
            )
            for c in pod.get("initContainers", [])
        ),
        memory_limit=memory,
        cpu_limit_millis=cpu,
        startup_probe=_probe(main.get("startupProbe"), ports),
        readiness_probe=_probe(main.get("readinessProbe"), ports),
        pre_stop=tuple(pre_stop),
        grace_seconds=float(pod.get("terminationGracePeriodSeconds", 30)),
    )


def python_pod(
    rendered: RenderedStack,
    workload: Mapping[str, Any],
    name: str,
    files: PodFiles,
    hosts: Path,
    extra_env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
) -> PodSpec:
    """A pod of the Celery Deployment or the scheduler Job, on this machine's root."""
    namespace = workload["metadata"]["namespace"]
    pod = workload["spec"]["template"]["spec"]
    volumes = materialize_volumes(pod, name, namespace, rendered, files, [])
    (main,) = pod["containers"]
    env = container_env(main, name, namespace, rendered)
    # The image's PATH and PYTHONPATH (app/Dockerfile), pointing at this checkout.
    venv_bin = Path(sys.executable).parent
    env = {
        "PATH": f"{venv_bin}:{CONTAINER_PATH}",
        "PYTHONPATH": str(ROOT),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        **env,
        **(extra_env or {}),
    }
    spec = _container_spec(
        main, pod, env, volumes, (Mount("/etc/hosts", hosts, read_only=True),), ()
    )
    argv = [*spec.argv, *extra_args]
    if argv and (venv_bin / argv[0]).exists():
        argv[0] = str(venv_bin / argv[0])
    memory, cpu = _limits(main)
    ports = {p["name"]: int(p["containerPort"]) for p in main.get("ports", [])}
    return PodSpec(
        name=name,
        root=None,
        container=ContainerSpec(
            name=spec.name,
            argv=tuple(argv),
            env=spec.env,
            mounts=spec.mounts,
            uid=spec.uid,
            gid=spec.gid,
            read_only_root=False,
        ),
        memory_limit=memory,
        cpu_limit_millis=cpu,
        readiness_probe=_probe(main.get("readinessProbe"), ports),
        grace_seconds=float(pod.get("terminationGracePeriodSeconds", 30)),
        restart=pod.get("restartPolicy", "Always") == "Always",
        # The "image": this checkout, its virtualenv and interpreter, and the run's
        # files, wherever they are (an emptyDir on /tmp must not hide a checkout there).
        keep_visible=tuple(
            dict.fromkeys(
                Path(p).resolve()
                for p in (ROOT, sys.prefix, sys.base_prefix, files.pod_dir.parent.parent)
            )
        ),
    )


def deployment_replicas(rendered: RenderedStack, deployment: Mapping[str, Any]) -> int:
    """``spec.replicas``, or the minReplicaCount of the ScaledObject that owns the count."""
    if "replicas" in deployment["spec"]:
        return int(deployment["spec"]["replicas"])
    name = deployment["metadata"]["name"]
    owners = [
        o
        for o in rendered.of_kind("ScaledObject")
        if o["spec"]["scaleTargetRef"]["name"] == name
        and o["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    ]
    if len(owners) != 1:
        raise TwinError(f"Deployment {name} has no replicas and {len(owners)} ScaledObjects")
    return int(owners[0]["spec"]["minReplicaCount"])


def without_probes(workload: Mapping[str, Any], command: Sequence[str] | None) -> dict[str, Any]:
    """A copy of a Deployment with its container's probes removed (and its command
    replaced, if given): the article's worker, or the publisher."""
    changed = copy.deepcopy(dict(workload))
    (container,) = changed["spec"]["template"]["spec"]["containers"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        container.pop(probe, None)
    if command is not None:
        container["command"] = list(command)
        container.pop("args", None)
    return changed


def stack_rabbitmq_version(stack: str) -> str:
    """The RabbitMQ major.minor a stack ships (its image tag)."""
    config = load_stack_config(stack_config(stack), stack)
    return image_version(config.rabbitmq.image)


class StatefulSetTwin:
    """A stack's RabbitMQ StatefulSet (and its Celery pods) as pods of one run here.

    Everything the run makes is named with its run id and lives under ``base_dir``
    (default: a new directory under /var/tmp/localcluster); :meth:`close` removes
    all of it, PVC directories included, whatever state the run is in.
    """

    def __init__(
        self,
        stack: str = "prod",
        *,
        overrides: Mapping[str, Any] | None = None,
        root: Path | None = None,
        base_dir: Path | None = None,
        run_id: str | None = None,
        statefulset: str = "rabbitmq-server",
    ) -> None:
        self.run_id = run_id or secrets.token_hex(3)
        self.stack = stack
        self.rendered = RenderedStack.render(stack, overrides)
        self.statefulset = self.rendered.get("StatefulSet", statefulset)
        image = self.statefulset["spec"]["template"]["spec"]["containers"][0]["image"]
        self.version = image_version(image)
        self.rendered = adapt_peer_discovery(self.rendered, self.statefulset)
        #: What this twin changed on the way from manifests to pods (for reports).
        self.adaptations = {
            k: v
            for k, v in ADAPTATIONS.items()
            if k != PEER_DISCOVERY_ADAPTATION or needs_kubernetes_api(image_version(image))
        }
        self.root = root or _root_for(self.version)
        if base_dir is None:
            sweep_stale_runs()
        self.base_dir = base_dir or RUNS_DIR / self.run_id
        self.base_dir.mkdir(parents=True, exist_ok=True)
        (self.base_dir / OWNER_FILE).write_text(_owner_token(os.getpid()))
        self.network = podnet.PodNetwork(self.run_id)
        # Claim the /24 now (the bridge holds its address), not at the first pod start:
        # another twin created meanwhile would pick the same free subnet.
        self.network.open()
        meta = self.statefulset["metadata"]
        self.namespace = meta["namespace"]
        self.service = self.statefulset["spec"]["serviceName"]
        replicas = int(self.statefulset["spec"]["replicas"])
        self.pod_names = [f"{meta['name']}-{i}" for i in range(replicas)]
        self.hosts = self.base_dir / "hosts"
        entries = {
            self.network.address_of(name): pod_dns_names(name, self.service, self.namespace)
            for name in self.pod_names
        }
        self.hosts.write_text(podnet.hosts_file(entries))
        self.pods: dict[str, pods.Pod] = {}
        self.extra_pods: dict[str, pods.Pod] = {}

    # --- files -------------------------------------------------------------------

    def files(self, pod: str) -> PodFiles:
        return PodFiles(self.base_dir / "pods" / pod, self.base_dir / "pvc" / pod)

    def pod_spec(self, ordinal: int) -> pods.PodSpec:
        name = self.pod_names[ordinal]
        return stateful_set_pod(
            self.rendered, self.statefulset, ordinal, self.root, self.files(name), self.hosts
        )

    # --- lifecycle ---------------------------------------------------------------

    def start_pod(self, ordinal: int) -> pods.Pod:
        """Create (or re-create) pod ``ordinal``: a new pod on the same PVC directory."""
        name = self.pod_names[ordinal]
        if name in self.pods:
            self.pods.pop(name).remove()
        pod = pods.Pod(self.pod_spec(ordinal), self.network, self.files(name).pod_dir)
        self.pods[name] = pod
        pod.start()
        return pod

    def start(self, timeout: float = 240) -> dict[str, float]:
        """Every pod at once (``podManagementPolicy: Parallel``); seconds until each is Ready."""
        for ordinal in range(len(self.pod_names)):
            self.start_pod(ordinal)
        return self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 240) -> dict[str, float]:
        return {name: pod.wait_ready(timeout) for name, pod in self.pods.items()}

    def address(self, ordinal: int) -> str:
        return self.network.address_of(self.pod_names[ordinal])

    def broker_urls(self, *, by_address: bool = False) -> list[str]:
        """The rendered failover list (DNS names, for pods); ``by_address`` for this host."""
        urls = self.rendered.data("Secret", "rabbitmq-credentials", self.namespace)["broker-urls"]
        result = urls.split(",")
        if by_address:
            for i, name in enumerate(self.pod_names):
                fqdn = pod_dns_names(name, self.service, self.namespace)[0]
                result = [u.replace(f"@{fqdn}:", f"@{self.address(i)}:") for u in result]
        return result

    # --- Celery pods -----------------------------------------------------------

    def _python_pod(
        self,
        workload: Mapping[str, Any],
        name: str,
        extra_env: Mapping[str, str] | None,
        extra_args: Sequence[str] = (),
    ) -> pods.Pod:
        files = self.files(name)
        spec = python_pod(
            self.rendered, workload, name, files, self.pod_hosts(name, files), extra_env, extra_args
        )
        return self.start_extra_pod(spec)

    def start_extra_pod(self, spec: pods.PodSpec) -> pods.Pod:
        """A pod beside the StatefulSet's (a Celery pod, the run's Prometheus), on the run's
        network and in its cgroups: :meth:`close` removes it, :meth:`leftovers` counts its
        processes and :func:`sweep_stale_runs` kills them if the run dies."""
        if spec.name in self.extra_pods:
            raise TwinError(f"the run already has a pod {spec.name}")
        pod = pods.Pod(spec, self.network, self.files(spec.name).pod_dir)
        self.extra_pods[spec.name] = pod
        pod.start()
        return pod

    def remove_extra_pod(self, name: str) -> None:
        """Kill a pod :meth:`start_extra_pod` started (by PID: its cgroup) and remove it."""
        pod = self.extra_pods.pop(name, None)
        if pod is not None:
            pod.remove()

    def pod_hosts(self, name: str, files: PodFiles) -> Path:
        """The pod's /etc/hosts: the run's, plus the pod's own name at its address, as the
        kubelet writes it (a lookup of the pod's own name must not wait for a DNS)."""
        hosts = files.volume("etc-hosts") / "hosts"
        hosts.parent.mkdir(parents=True, exist_ok=True)
        hosts.write_text(self.hosts.read_text() + f"{self.network.address_of(name)}\t{name}\n")
        hosts.chmod(0o644)
        return hosts

    @property
    def deployment(self) -> dict[str, Any]:
        (deployment,) = self.rendered.of_kind("Deployment")
        return deployment

    def worker_env(self) -> dict[str, str]:
        """The worker container's literal env values, as the rendered Deployment sets them."""
        container = self.deployment["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}

    def worker_replicas(self) -> int:
        """The Deployment's replica count, or, when KEDA scales it, the ScaledObject's
        floor (KEDA is not here: see ADAPTATIONS)."""
        return deployment_replicas(self.rendered, self.deployment)

    def worker_names(self) -> list[str]:
        name = self.deployment["metadata"]["name"]
        return [f"{name}-{i}" for i in range(self.worker_replicas())]

    def start_worker(self, name: str, extra_env: Mapping[str, str] | None = None) -> pods.Pod:
        """One pod of the worker Deployment (its command, env and broker Secret)."""
        return self._python_pod(self.deployment, name, extra_env)

    def start_workers(self, extra_env: Mapping[str, str] | None = None) -> list[pods.Pod]:
        """The worker Deployment's replicas as pods."""
        return [self.start_worker(name, extra_env) for name in self.worker_names()]

    def start_command_pod(
        self, name: str, command: Sequence[str], extra_env: Mapping[str, str] | None = None
    ) -> pods.Pod:
        """A pod of the worker Deployment's template (its env, broker Secret, network and
        limits) running ``command`` once instead of the worker (no probes, not restarted)."""
        workload = without_probes(self.deployment, command)
        workload["spec"]["template"]["spec"]["restartPolicy"] = "Never"
        return self._python_pod(workload, name, extra_env)

    def run_scheduler(
        self, extra_env: Mapping[str, str] | None = None, extra_args: Sequence[str] = ()
    ) -> pods.Pod:
        """The scheduler Job's pod (the stack, or ``overrides``, must enable it)."""
        jobs = self.rendered.of_kind("Job")
        if not jobs:
            raise TwinError(f"stack {self.stack} renders no scheduler Job (workers.scheduler)")
        (job,) = jobs
        base = job["metadata"]["name"]
        name = f"{base}-{sum(p.startswith(base) for p in self.extra_pods)}"
        return self._python_pod(job, name, extra_env, extra_args)

    def connected_ordinals(self, pid: int, port: int = 5672) -> list[int]:
        """The StatefulSet pods process ``pid`` (in a pod) has connections to on ``port``
        (AMQP by default), most connections first (from /proc)."""
        counts: Counter[int] = Counter()
        for (ip, peer_port), n in established_endpoints(pid).items():
            ordinal = self.ordinal_of_address(ip)
            if peer_port == port and ordinal is not None:
                counts[ordinal] += n
        return [ordinal for ordinal, _ in counts.most_common()]

    def ordinal_of_address(self, address: str) -> int | None:
        for i in range(len(self.pod_names)):
            if self.address(i) == address:
                return i
        return None

    def shared_dir(self, name: str) -> Path:
        """A directory every pod of the run can write (a ledger, say)."""
        path = self.base_dir / "shared" / name
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o1777)
        return path

    def rabbitmqctl(self, ordinal: int, *args: str, timeout: float = 60) -> str:
        done = self.pods[self.pod_names[ordinal]].exec(["rabbitmqctl", *args], timeout=timeout)
        if done.returncode != 0:
            raise TwinError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip()[-500:]}")
        return done.stdout

    def running_nodes(self, ordinal: int = 0) -> list[str]:
        status = json.loads(self.rabbitmqctl(ordinal, "cluster_status", "--formatter", "json"))
        return sorted(status["running_nodes"])

    def leftovers(self) -> dict[str, list[str]]:
        """What this run still has on the machine: processes, namespaces, cgroups, mounts."""
        procs = [
            str(p) for pod in [*self.pods.values(), *self.extra_pods.values()] for p in pod.pids()
        ]
        cgroups = [
            str(d) for c in pods.CONTROLLERS if (d := pods.run_cgroup(c, self.run_id)).exists()
        ]
        with open("/proc/mounts") as f:
            mounts = [line.split()[1] for line in f if str(self.base_dir) in line.split()[1]]
        return {
            "processes": procs,
            "netns": self.network.namespaces(),
            "cgroups": cgroups,
            "mounts": mounts,
            "files": [str(self.base_dir)] if self.base_dir.exists() else [],
        }

    def close(self) -> None:
        errors = []
        for pod in [*self.extra_pods.values(), *self.pods.values()]:
            try:
                pod.remove()
            except Exception as error:  # keep removing the rest
                errors.append(f"{pod.name}: {error}")
        try:
            self.network.close()
        except Exception as error:
            errors.append(f"network: {error}")
        pods.remove_run_cgroups(self.run_id)
        pods.remove_tree(self.base_dir)
        if errors:
            raise TwinError("; ".join(errors))

    def __enter__(self) -> StatefulSetTwin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- kubectl's operations, by ordinal (tests and runs) -------------------------

    def pod(self, ordinal: int) -> pods.Pod:
        """The pod ``<statefulset>-<ordinal>`` (as last started)."""
        return self.pods[self.pod_names[ordinal]]

    def is_running(self, ordinal: int) -> bool:
        name = self.pod_names[ordinal]
        return name in self.pods and self.pods[name].running()

    def kill_pod(self, ordinal: int) -> None:
        """SIGKILL every process of the pod at once (a node that crashes)."""
        self.pod(ordinal).kill()

    def set_label(self, ordinal: int, key: str, value: str) -> None:
        """``kubectl label pod``: the pod's downward API files of that label follow it (a
        new pod of the StatefulSet starts without it, as in Kubernetes)."""
        name = self.pod_names[ordinal]
        field = f"metadata.labels['{key}']"
        found = False
        for volume in self.statefulset["spec"]["template"]["spec"].get("volumes", []):
            for item in (volume.get("downwardAPI") or {}).get("items", []):
                if item.get("fieldRef", {}).get("fieldPath") == field:
                    (self.files(name).volume(volume["name"]) / item["path"]).write_text(value)
                    found = True
        if not found:
            raise TwinError(f"{name}: no downward API file shows the label {key!r}")

    def stop_pods(self, ordinals: Sequence[int] | None = None) -> dict[int, float]:
        """Graceful stops of the pods, all at once (``kubectl delete pod`` of each: preStop,
        SIGTERM, SIGKILL after the grace period); the seconds each took."""
        chosen = list(range(len(self.pod_names))) if ordinals is None else list(ordinals)
        took: dict[int, float] = {}
        errors: list[str] = []

        def stop(ordinal: int) -> None:
            try:
                took[ordinal] = self.pod(ordinal).stop()
            except Exception as error:  # reported below, after every stop ended
                errors.append(f"{self.pod_names[ordinal]}: {error!r}")

        threads = [threading.Thread(target=stop, args=(i,)) for i in chosen]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise TwinError("; ".join(errors))
        return took

    def restart_pods(self, ordinals: Sequence[int] | None = None, timeout: float = 300) -> float:
        """New pods on the same PVC directories, all at once (Parallel); the seconds until
        they are Ready and every pod lists every pod as a running node."""
        chosen = list(range(len(self.pod_names))) if ordinals is None else list(ordinals)
        begin = time.monotonic()
        for ordinal in chosen:
            self.start_pod(ordinal)
        for ordinal in chosen:
            self.pod(ordinal).wait_ready(timeout)
        self.wait_clustered(max(1.0, timeout - (time.monotonic() - begin)))
        return time.monotonic() - begin

    def wait_clustered(self, timeout: float = 240) -> float:
        """Until every pod lists every pod as a running node; the seconds it took."""
        begin = time.monotonic()
        expected = len(self.pod_names)
        while True:
            try:
                if all(len(self.running_nodes(i)) == expected for i in range(expected)):
                    return time.monotonic() - begin
            except (
                TwinError,
                pods.PodError,
                KeyError,
                ValueError,
                OSError,
                subprocess.TimeoutExpired,
            ):
                pass  # a pod not (yet) running or answering
            if time.monotonic() - begin > timeout:
                raise TwinError(f"the pods did not form one cluster in {timeout:.0f} s")
            time.sleep(1)

    def rabbitmq_diagnostics(self, ordinal: int, *args: str, timeout: float = 60) -> str:
        done = self.pod(ordinal).exec(["rabbitmq-diagnostics", *args], timeout=timeout)
        if done.returncode != 0:
            raise TwinError(f"rabbitmq-diagnostics {' '.join(args)}: {done.stderr.strip()[-500:]}")
        return done.stdout


def _root_for(version: str) -> Path:
    from localcluster import rootfs

    spec = rootfs.for_version(version)
    trouble = rootfs.problem(spec)
    if trouble is not None:
        raise TwinError(
            f"the root filesystem {spec.describe()} is {trouble}: build it with "
            f"{rootfs.root_commands()}"
        )
    return rootfs.root_path(spec)


def _owner_token(pid: int) -> str:
    """``pid`` and its start time (field 22 of /proc/<pid>/stat); "" when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return f"{pid} {stat[stat.rindex(')') + 2 :].split()[19]}"


def _run_pids(run_id: str) -> list[int]:
    base = pods.run_cgroup("pids", run_id)
    return [int(p) for procs in base.glob("*/cgroup.procs") for p in procs.read_text().split()]


def sweep_stale_runs(runs_dir: Path = RUNS_DIR) -> list[str]:
    """Remove what runs whose owner died (SIGKILL, a CI time-out) left behind: their
    processes (by cgroup), network namespaces, bridge, cgroups and directory.

    A run cleans up after itself on every exit path it can see; this covers the one
    it cannot (its own SIGKILL). Returns the run ids swept.
    """
    swept: list[str] = []
    if not runs_dir.is_dir():
        return swept
    for run_dir in sorted(runs_dir.iterdir()):
        try:
            token = (run_dir / OWNER_FILE).read_text().strip()
        except OSError:
            continue  # not a run of ours, or one still being created
        if token and _owner_token(int(token.split()[0])) == token:
            continue  # its owner is alive
        run_id = run_dir.name
        deadline = time.monotonic() + 10
        while (victims := _run_pids(run_id)) and time.monotonic() < deadline:
            for victim in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, signal.SIGKILL)
            time.sleep(0.1)
        podnet.PodNetwork(run_id, subnet=podnet.POD_RANGE).close()
        pods.remove_run_cgroups(run_id)
        pods.remove_tree(run_dir)
        swept.append(run_id)
    return swept
