"""The run's Prometheus (``make local``): Debian's prometheus 2.42.0 as a pod of the run,
scraping the RabbitMQ pods and the worker pods as the rendered PodMonitorings say and
evaluating the alert rules (``components/monitoring.py: rule_groups`` and
``worker_rule_groups``, written once) at the twin's size.

* :func:`prometheus_config` (pure): the ``prometheus.yml`` text. One scrape job per
  PodMonitoring, with its name, port, path and params, one target per pod its
  selector matches, labelled ``namespace``, ``pod``, ``container`` and ``instance``
  (``<pod>:<port name>``) as Managed Prometheus labels its targets, so the rules'
  ``by (pod)`` reads the same series here as on GKE. The RabbitMQ targets are static
  (a StatefulSet's pods keep their names and addresses); the workers' are a file the
  run rewrites (:func:`target_file`), because a Deployment's pod is replaced under a
  new name and address, which Kubernetes' discovery follows and a static list cannot.
* :func:`twin_monitoring` (pure): the stack's monitoring config at the twin's size.
  A fault lasts seconds here, not the minutes ``nodeDownSeconds`` (120 s) and
  ``workerDownSeconds`` (300 s) wait for, so the twin scrapes and evaluates every
  second and alerts after 2 s (an adaptation, reported as such).
* :func:`alert_intervals` (pure): from the samples of ``ALERTS{alertstate="firing"}``
  (one per evaluation while an alert fires), when each alert fired and resolved.
* :class:`RunPrometheus`: the pod (the Prometheus root from ``make setup``, read-only,
  its TSDB on a directory under the run's directory), Ready once ``/-/ready`` answers.
  It is one of the twin's pods (``extra_pods``), so the twin's ``close()`` kills it by
  PID and removes its directory on every exit path, its processes count in
  ``leftovers()`` and ``sweep_stale_runs`` kills it (by cgroup) if the run was killed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from components import monitoring
from components.config import MonitoringConfig, load_stack_config
from localcluster import pods, rootfs
from localcluster.pods import ContainerSpec, Mount, PodSpec, Probe
from localcluster.twin import StatefulSetTwin
from tools.mockrun import stack_config

POD_NAME = "prometheus"
LISTEN_PORT = 9090
CONFIG_DIR = "/etc/prometheus"
DATA_DIR = "/prometheus"
RULE_FILE = "rules.yml"
#: The worker targets (file-based discovery), beside prometheus.yml.
WORKER_TARGETS_FILE = "celery-workers.json"
#: The official image's user (nobody): Prometheus needs no privilege.
UID = GID = 65534
#: A run lasts minutes: an hour of samples is more than it ever has.
RETENTION = "1h"
MEMORY_LIMIT = 512 * 1024 * 1024
#: The twin's size: scrape and evaluate every second, alert after 2 s of a missing pod.
TWIN_SCRAPE_SECONDS = 1
TWIN_NODE_DOWN_SECONDS = 2
TWIN_WORKER_DOWN_SECONDS = 2
#: Labels of an ``ALERTS`` series that are not the alert's own.
ALERT_SERIES_LABELS = ("__name__", "alertname", "alertstate", "severity")


class PrometheusError(RuntimeError):
    pass


# --- what it scrapes and evaluates (pure) ---------------------------------------------


def twin_monitoring(config: MonitoringConfig) -> MonitoringConfig:
    """``config`` at the twin's size: the stack config allows 5-300 s scrapes and
    minutes of ``nodeDownSeconds`` and ``workerDownSeconds``; a fault here is over in
    seconds."""
    return dataclasses.replace(
        config,
        scrape_interval_seconds=TWIN_SCRAPE_SECONDS,
        node_down_seconds=TWIN_NODE_DOWN_SECONDS,
        worker_down_seconds=TWIN_WORKER_DOWN_SECONDS,
    )


def twin_adaptation(stack: MonitoringConfig, twin: MonitoringConfig) -> str:
    """The report's words for what :func:`twin_monitoring` changed."""
    changed = [
        f"{f.name} {getattr(stack, f.name)} -> {getattr(twin, f.name)}"
        for f in dataclasses.fields(MonitoringConfig)
        if getattr(stack, f.name) != getattr(twin, f.name)
    ]
    return (
        "Managed Prometheus is Debian's prometheus 2.42.0 as a pod of the run, scraping "
        "the pods' addresses as the PodMonitorings say; the monitoring config at the "
        f"twin's size (a fault lasts seconds, not minutes): {', '.join(changed)}"
    )


@dataclass(frozen=True)
class ScrapedPod:
    """A pod a PodMonitoring may select: what its scrape target is made of."""

    name: str
    namespace: str
    address: str
    labels: Mapping[str, str]
    container: str
    ports: Mapping[str, int]  # container ports by name


def _pod_template(workload: Mapping[str, Any]) -> tuple[dict[str, str], Mapping[str, Any]]:
    """A workload's pod labels and its one container."""
    template = workload["spec"]["template"]
    containers = template["spec"]["containers"]
    if len(containers) != 1:
        raise PrometheusError(
            f"{workload['kind']} {workload['metadata']['name']} has {len(containers)} "
            "containers: the twin labels a target with the pod's one container"
        )
    return dict(template["metadata"].get("labels", {})), containers[0]


def _scraped_pod(workload: Mapping[str, Any], name: str, address: str) -> ScrapedPod:
    labels, container = _pod_template(workload)
    return ScrapedPod(
        name=name,
        namespace=workload["metadata"]["namespace"],
        address=address,
        labels=labels,
        container=container["name"],
        ports={p["name"]: int(p["containerPort"]) for p in container.get("ports", [])},
    )


def statefulset_pods(statefulset: Mapping[str, Any], addresses: Sequence[str]) -> list[ScrapedPod]:
    """A StatefulSet's pods (``<name>-<ordinal>``, one per address), as a PodMonitoring
    selects them: its template's labels, its container's name and named ports."""
    name = statefulset["metadata"]["name"]
    return [
        _scraped_pod(statefulset, f"{name}-{ordinal}", address)
        for ordinal, address in enumerate(addresses)
    ]


def deployment_pods(
    deployment: Mapping[str, Any], addresses: Mapping[str, str]
) -> list[ScrapedPod]:
    """A Deployment's pods, as a PodMonitoring selects them: ``addresses`` by pod name
    (the run names its pods; Kubernetes' ReplicaSet would name them at random)."""
    return [_scraped_pod(deployment, name, address) for name, address in addresses.items()]


def _endpoint(pod_monitoring: Mapping[str, Any]) -> Mapping[str, Any]:
    spec = pod_monitoring["spec"]
    if len(spec["endpoints"]) != 1:
        raise PrometheusError(
            f"PodMonitoring {pod_monitoring['metadata']['name']} has {len(spec['endpoints'])} "
            "endpoints: the twin mirrors one endpoint per PodMonitoring (a job each)"
        )
    endpoint: Mapping[str, Any] = spec["endpoints"][0]
    return endpoint


def target_groups(
    pod_monitoring: Mapping[str, Any], scraped: Sequence[ScrapedPod], *, may_be_empty: bool = False
) -> list[dict[str, Any]]:
    """The targets of a PodMonitoring among ``scraped``: a group per pod it selects,
    labelled as Managed Prometheus labels them. Selecting no pod is an error, unless
    ``may_be_empty`` (a target file before any worker pod is Ready)."""
    meta, spec = pod_monitoring["metadata"], pod_monitoring["spec"]
    job, port = meta["name"], _endpoint(pod_monitoring)["port"]
    selector = spec["selector"]["matchLabels"]
    chosen = [
        p
        for p in scraped
        if p.namespace == meta["namespace"] and selector.items() <= p.labels.items()
    ]
    if not chosen and not may_be_empty:
        raise PrometheusError(f"PodMonitoring {job} selects {selector}: no pod has them")
    missing = [p.name for p in chosen if port not in p.ports]
    if missing:
        raise PrometheusError(f"PodMonitoring {job}: pods {missing} have no port {port!r}")
    return [
        {
            "targets": [f"{p.address}:{p.ports[port]}"],
            "labels": {
                "namespace": p.namespace,
                "pod": p.name,
                "container": p.container,
                "instance": f"{p.name}:{port}",
            },
        }
        for p in chosen
    ]


def scrape_configs(
    monitorings: Sequence[Mapping[str, Any]],
    scraped: Sequence[ScrapedPod],
    target_files: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One Prometheus scrape job per PodMonitoring (its name is the job, as on GKE).
    A job in ``target_files`` reads its targets from that file (``file_sd_configs``);
    ``scraped`` still holds its pods, to check its selector and port against."""
    files = target_files or {}
    jobs = []
    for pod_monitoring in monitorings:
        job = pod_monitoring["metadata"]["name"]
        endpoint = _endpoint(pod_monitoring)
        groups = target_groups(pod_monitoring, scraped)
        config: dict[str, Any] = {
            "job_name": job,
            "scrape_interval": endpoint["interval"],
            # Managed Prometheus' default: the interval (a scrape never overlaps the next).
            "scrape_timeout": endpoint.get("timeout", endpoint["interval"]),
            "metrics_path": endpoint.get("path", "/metrics"),
        }
        if endpoint.get("params"):
            config["params"] = {k: list(v) for k, v in endpoint["params"].items()}
        if job in files:
            # Prometheus watches the file (inotify) and re-reads it every interval too.
            config["file_sd_configs"] = [
                {"files": [files[job]], "refresh_interval": endpoint["interval"]}
            ]
        else:
            config["static_configs"] = groups
        jobs.append(config)
    return jobs


def target_file(pod_monitoring: Mapping[str, Any], scraped: Sequence[ScrapedPod]) -> str:
    """A ``file_sd_configs`` file: the PodMonitoring's targets among ``scraped``."""
    return json.dumps(target_groups(pod_monitoring, scraped, may_be_empty=True), indent=1) + "\n"


def pod_monitorings(args: monitoring.MonitoringArgs) -> list[dict[str, Any]]:
    """The PodMonitorings the program renders, from the same functions, at ``args``'
    size (the rendered ones differ only in their intervals): RabbitMQ's, and the
    workers' when they serve metrics (not with prefork)."""
    found = [monitoring.rabbitmq_pod_monitoring(args), monitoring.queue_pod_monitoring(args)]
    if args.worker_metrics:
        found.append(monitoring.worker_pod_monitoring(args))
    return found


def prometheus_config(
    monitorings: Sequence[Mapping[str, Any]],
    scraped: Sequence[ScrapedPod],
    evaluation_seconds: int,
    rule_path: str = f"{CONFIG_DIR}/{RULE_FILE}",
    target_files: Mapping[str, str] | None = None,
) -> str:
    """The ``prometheus.yml`` of the run's Prometheus (its rule file beside it)."""
    interval = f"{evaluation_seconds}s"
    document = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [rule_path],
        "scrape_configs": scrape_configs(monitorings, scraped, target_files),
    }
    return yaml.safe_dump(document, sort_keys=False)


def rule_file(args: monitoring.MonitoringArgs) -> str:
    """The rule file: the very groups the ``Rules`` objects carry, at ``args``' size
    (one Prometheus evaluates both; on GKE each namespace's ``Rules`` reads its own
    namespace's metrics, and each group's series come from its own namespace's jobs)."""
    groups = monitoring.rule_groups(args)
    if args.worker_metrics:
        groups = [*groups, *monitoring.worker_rule_groups(args)]
    return yaml.safe_dump({"groups": groups}, sort_keys=False)


def monitoring_args(
    stack: str, overrides: Mapping[str, Any], vhost: str
) -> tuple[monitoring.MonitoringArgs, MonitoringConfig]:
    """The stack's MonitoringArgs at the twin's size, and the stack's own config."""
    config = load_stack_config({**stack_config(stack), **overrides}, stack)
    shipped = monitoring.MonitoringArgs.from_stack(config, vhost)
    sized = dataclasses.replace(shipped, monitoring=twin_monitoring(config.monitoring))
    return sized, config.monitoring


# --- what fired (pure) ------------------------------------------------------------------


@dataclass(frozen=True)
class AlertInterval:
    """One stretch during which an alert fired. Times are wall-clock (Unix seconds)."""

    alert: str
    severity: str
    labels: Mapping[str, str]  # the alert's own (``pod`` for a per-pod alert)
    fired: float  # the first evaluation that found it firing
    resolved: float | None  # the first evaluation after the last firing one; None: firing


def alert_intervals(
    series: Sequence[Mapping[str, Any]],
    evaluation_seconds: float,
    firing_now: Sequence[Mapping[str, str]] = (),
) -> list[AlertInterval]:
    """When each alert fired and resolved, from the raw samples of
    ``ALERTS{alertstate="firing"}`` (``series``: the query API's matrix, one sample per
    evaluation while firing). Samples more than two evaluations apart are two stretches.
    The last stretch of an alert in ``firing_now`` (``/api/v1/alerts``) is unresolved."""
    now_keys = {_key(labels) for labels in firing_now}
    found = []
    for one in series:
        labels = dict(one["metric"])
        times = sorted(float(ts) for ts, _ in one["values"])
        if not times:
            continue
        stretches = [[times[0], times[0]]]
        for ts in times[1:]:
            if ts - stretches[-1][1] > 2 * evaluation_seconds:
                stretches.append([ts, ts])
            else:
                stretches[-1][1] = ts
        own = {k: v for k, v in labels.items() if k not in ALERT_SERIES_LABELS}
        for n, (first, last) in enumerate(stretches):
            still = n == len(stretches) - 1 and _key(labels) in now_keys
            found.append(
                AlertInterval(
                    alert=labels.get("alertname", "?"),
                    severity=labels.get("severity", ""),
                    labels=own,
                    fired=first,
                    resolved=None if still else last + evaluation_seconds,
                )
            )
    return sorted(found, key=lambda a: (a.fired, a.alert))


def _key(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in labels.items() if k not in ("__name__", "alertstate")))


# --- the pod ----------------------------------------------------------------------------


def _no_proxy() -> urllib.request.OpenerDirector:
    # Pod addresses are on this machine's bridge: never through an http_proxy.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


class RunPrometheus:
    """Prometheus as a pod of ``cluster``: :meth:`start`, :meth:`alerts`; the twin's
    ``close()`` removes it (or :meth:`stop`, earlier)."""

    def __init__(self, cluster: StatefulSetTwin, args: monitoring.MonitoringArgs) -> None:
        self.twin = cluster
        self.args = args
        self.evaluation_seconds = args.monitoring.scrape_interval_seconds
        self.pod: pods.Pod | None = None
        self._http = _no_proxy()
        self.version = rootfs.PROMETHEUS.version
        #: The worker pods in its target file (:meth:`scrape_workers`).
        self.worker_targets: list[str] = []
        self._config_dir: Path | None = None  # while started

    @property
    def url(self) -> str:
        if self.pod is None:
            raise PrometheusError("the run's Prometheus is not started")
        return f"http://{self.pod.address}:{LISTEN_PORT}"

    def worker_pods(self, names: Sequence[str]) -> list[ScrapedPod]:
        """Worker pods of the run by name, at their addresses on the run's bridge (an
        address is allocated by name, kept across the pod's restarts)."""
        addresses = {name: self.twin.network.address_of(name) for name in names}
        return deployment_pods(self.twin.deployment, addresses)

    def scraped_pods(self) -> list[ScrapedPod]:
        """The RabbitMQ StatefulSet's pods, at their addresses on the run's bridge, and
        the worker pods the run starts (what the PodMonitorings' selectors are checked
        against; the workers' targets are the file :meth:`scrape_workers` writes)."""
        addresses = [self.twin.address(i) for i in range(len(self.twin.pod_names))]
        found = statefulset_pods(self.twin.statefulset, addresses)
        if self.args.worker_metrics:
            found += self.worker_pods(self.twin.worker_names())
        return found

    def target_files(self) -> dict[str, str]:
        if not self.args.worker_metrics:
            return {}
        return {monitoring.WORKERS_JOB: f"{CONFIG_DIR}/{WORKER_TARGETS_FILE}"}

    def config_text(self) -> str:
        return prometheus_config(
            pod_monitorings(self.args),
            self.scraped_pods(),
            self.evaluation_seconds,
            target_files=self.target_files(),
        )

    def targets(self) -> int:
        """How many targets it scrapes now (a pod per job)."""
        configs = scrape_configs(
            pod_monitorings(self.args), self.scraped_pods(), self.target_files()
        )
        static = sum(len(c.get("static_configs", [])) for c in configs)
        return static + (len(self.worker_targets) if self.args.worker_metrics else 0)

    def scrape_workers(self, names: Sequence[str]) -> None:
        """Make ``names`` the worker pods it scrapes: rewrite the target file (atomically:
        Prometheus may read it at any moment). It applies the change within its
        discovery's update period (5 s)."""
        self.worker_targets = list(names)
        folder = self._config_dir
        if not self.args.worker_metrics or folder is None:
            return
        text = target_file(
            monitoring.worker_pod_monitoring(self.args), self.worker_pods(self.worker_targets)
        )
        staged = folder / f".{WORKER_TARGETS_FILE}.new"
        staged.write_text(text)
        staged.chmod(0o644)
        staged.replace(folder / WORKER_TARGETS_FILE)

    def pod_spec(self, config_dir: Path, data_dir: Path, hosts: Path) -> PodSpec:
        reason = rootfs.problem(rootfs.PROMETHEUS)
        if reason is not None:
            raise PrometheusError(
                f"the run's Prometheus comes from the root {rootfs.PROMETHEUS.describe()} at "
                f"{rootfs.root_path(rootfs.PROMETHEUS)}: {reason}. Build it: "
                f"{rootfs.ROOT_COMMANDS}"
            )
        return PodSpec(
            name=POD_NAME,
            root=rootfs.root_path(rootfs.PROMETHEUS),
            container=ContainerSpec(
                name=POD_NAME,
                argv=(
                    "prometheus",
                    f"--config.file={CONFIG_DIR}/prometheus.yml",
                    f"--storage.tsdb.path={DATA_DIR}",
                    f"--storage.tsdb.retention.time={RETENTION}",
                    f"--web.listen-address=:{LISTEN_PORT}",
                ),
                mounts=(
                    Mount(CONFIG_DIR, config_dir, read_only=True),
                    Mount(DATA_DIR, data_dir),
                    Mount("/etc/hosts", hosts, read_only=True),
                ),
                uid=UID,
                gid=GID,
                read_only_root=True,
            ),
            memory_limit=MEMORY_LIMIT,
            readiness_probe=Probe(tcp_port=LISTEN_PORT, period=1.0),
            grace_seconds=5.0,
        )

    def start(self, timeout: float = 60) -> float:
        """Start the pod and wait until Prometheus says it is ready; the seconds it took."""
        begin = time.monotonic()
        files = self.twin.files(POD_NAME)
        config_dir, data_dir = files.volume("config"), files.volume("data")
        for folder in (config_dir, data_dir):
            folder.mkdir(parents=True, exist_ok=True)
        (config_dir / "prometheus.yml").write_text(self.config_text())
        (config_dir / RULE_FILE).write_text(rule_file(self.args))
        # No worker target until the run says a worker pod is Ready (scrape_workers).
        self._config_dir = config_dir
        self.scrape_workers(self.worker_targets)
        # Its user reads the config and owns the TSDB.
        for path in (config_dir, *config_dir.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        data_dir.chmod(0o700)
        os.chown(data_dir, UID, GID)
        # Prometheus looks its own hostname up when it loads the scrape config (GetFQDN):
        # without it in /etc/hosts that is a DNS query the pod network never answers, 10 s.
        hosts = self.twin.pod_hosts(POD_NAME, files)
        self.pod = self.twin.start_extra_pod(self.pod_spec(config_dir, data_dir, hosts))
        deadline = begin + timeout
        while not self._ready():
            if not self.pod.running() or time.monotonic() > deadline:
                raise PrometheusError(
                    f"the run's Prometheus is not ready after {time.monotonic() - begin:.0f} s: "
                    f"{self.pod.tail()}"
                )
            time.sleep(0.2)
        return time.monotonic() - begin

    def wait_scraping(self, timeout: float = 60) -> float:
        """Until every target was scraped and answered (``up`` 1 for each): a started
        Prometheus applies its scrape config (and a changed target file) only after its
        discovery's update period (5 s). Until then ``RabbitMQNodeDown`` is true (no
        ``up`` yet) and fires once, before any fault. Returns the seconds it waited."""
        begin = time.monotonic()
        wanted = self.targets()
        while len(self._get("/api/v1/query", query="up == 1")["result"]) < wanted:
            if time.monotonic() - begin > timeout:
                raise PrometheusError(
                    f"the run's Prometheus did not scrape all {wanted} targets in {timeout:.0f} s: "
                    f"{self._get('/api/v1/query', query='up')['result']}"
                )
            time.sleep(0.2)
        return time.monotonic() - begin

    def _ready(self) -> bool:
        try:
            with self._http.open(f"{self.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def _get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with self._http.open(f"{self.url}{path}?{query}", timeout=10) as response:
            body = json.loads(response.read().decode())
        if body.get("status") != "success":
            raise PrometheusError(f"GET {path} {params}: {body}")
        return body["data"]

    def alerts(self, since: float) -> list[AlertInterval]:
        """Every stretch an alert fired from ``since`` (wall-clock) until now."""
        now = time.time()
        window = max(1, math.ceil(now - since) + 1)
        matrix = self._get(
            "/api/v1/query", query=f'ALERTS{{alertstate="firing"}}[{window}s]', time=f"{now:.3f}"
        )
        active = self._get("/api/v1/alerts")["alerts"]
        firing_now = [a["labels"] for a in active if a.get("state") == "firing"]
        return alert_intervals(matrix["result"], self.evaluation_seconds, firing_now)

    def running(self) -> bool:
        return self.pod is not None and self.pod.running()

    def stop(self) -> None:
        """Kill it (by PID, its whole cgroup) and remove its pod and TSDB."""
        self.twin.remove_extra_pod(POD_NAME)
        self.pod = None
        self._config_dir = None
