"""``python -m bench`` (``make bench``): the article's configuration against ours, on pods.

Two pod twins (:class:`localcluster.twin.StatefulSetTwin`) of the prod stack, the
program's own rendered StatefulSet, Deployment and Secrets run as pods here:

* ``article``: the stack with its RabbitMQ image set to 3.10.8 (``rabbitmq.image``, as
  ``pulumi config set`` would; a 3.x that still has classic mirroring, which 4.0
  removed), pods on the bookworm root (:data:`localcluster.rootfs.RABBITMQ_3_10`).
  Vhost ``article`` with the article's policy, set with ``rabbitmqctl set_policy -p
  article ha-all ".*" '{"ha-mode":"all","ha-sync-mode":"automatic"}'``, and
  ``bench.article_app``: Celery's defaults but the broker URL list (early ack, prefetch
  x4, no publisher confirms, classic ``celery`` queue on a direct exchange, URL list not
  rotated), prefork pool with Celery's default concurrency (one process per CPU). Its
  workers are the Deployment's pods with the article's command (see
  :data:`BENCH_ADAPTATIONS`);
* ``ours``: the stack as shipped, RabbitMQ 4.3.6 pods, the definitions' vhost (its
  quorum-queue delivery-limit policy), and the worker Deployment's pods exactly as
  rendered (``app.celery``: quorum queue, late ack, prefetch 1, confirms, the threads
  pool at the stack's concurrency, URL list rotated per pod).

Both twins are up for the whole bench and the runs interleave (article, ours,
article, ...): a load spike on this shared machine then hits both sides, where one
twin after the other would put every spike on one side. The price is the idle twin's
RabbitMQ pods running beside the measured one; the CPU seconds they used are recorded
per run (``idle_twin_cpu_s``) so that price is visible, not assumed.

Each run, for each configuration: 3 worker pods, and in order

1. ``publish``: one publisher pod (``python -m bench.publish``) publishes
   ``--publish-tasks`` no-op tasks while no worker consumes (the workers are up, told
   to cancel their consumer through Celery's remote control): publish rate; then as
   many again with publisher confirms switched (on for the article, off for ours);
2. ``drain``: the workers are told to consume again, all at once: drain rate;
3. ``sleep``: ``--sleep-tasks`` tasks sleeping ``--sleep-seconds`` each, published to
   the idle workers: time from the first publish to the last completion, against
   ``tasks x seconds / slots``;
4. ``failover``: ``--failover-tasks`` short tasks published at ``--failover-rate``;
   once ``--fault-at`` of them completed, the RabbitMQ pod worker pod 0 is connected
   to is SIGKILLed (every process of the pod), and a new pod is started on its PVC
   directory ``--down-seconds`` later: tasks lost, duplicate executions, failover gap.

The bench itself (remote control, queue checks, reading the ledger) runs on this
host and reaches the pods by address. Every pod, network namespace, bridge, cgroup
and directory of both twins is removed on success, failure, Ctrl-C or SIGTERM, and
checked (``StatefulSetTwin.leftovers``). Writes ``results.json`` and ``bench.png`` to
``--out`` and prints the table. Exit status: 0 when every phase ran (tasks lost by the
article's configuration are a result, not an error), 2 on an error, 130 when
interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from celery import Celery
from kombu import Connection

from app import ledger
from app.settings import (
    ENV_BROKER_ROTATION,
    ENV_BROKER_URLS,
    ENV_CONCURRENCY,
    ENV_HOSTNAME,
    ENV_REMOTE_CONTROL,
    WorkerSettings,
)
from bench.results import (
    CONFIG_KEYS,
    build_results,
    format_table,
    per_1000,
    plot_results,
    slot_usage,
)
from localcluster import pods, rootfs, twin
from localcluster.cli_types import fraction, non_negative_float, positive_float, positive_int
from localcluster.console import Console, run_guarded
from localcluster.report import LedgerTail, longest_gap, read_events
from tools.mockrun import stack_config

log = logging.getLogger("bench")

STACK = "prod"
AMQP_PORT = 5672
WORKERS = 3  # the prod stack's worker replicas; checked against the Deployment
ARTICLE_VHOST = "article"
HA_ALL_POLICY = '{"ha-mode":"all","ha-sync-mode":"automatic"}'
COUNT_STEPS = 10  # app.tasks.count sleeps 10 x step_seconds
#: The article's RabbitMQ: the version the 3.10 root filesystem pins (one source).
ARTICLE_RABBITMQ_IMAGE = f"rabbitmq:{rootfs.RABBITMQ_3_10.upstream_version}-management"
#: The article's worker command (its `celery -A tasks worker`, with our task module).
ARTICLE_WORKER_COMMAND = ("celery", "--app=bench.article_app", "worker", "--loglevel=INFO")
PUBLISHER_POD = "bench-publisher"
#: Worker slots the scaling curve measures, each side up to its own limit (3 pods x its
#: per-pod concurrency: the article's Celery default, one process per CPU; ours as shipped).
DEFAULT_SCALING_SLOTS = (1, 3, 6, 24, 96)


def slot_layout(slots: int) -> tuple[int, int]:
    """Worker pods and per-pod concurrency for ``slots``: up to 3 pods of 1 slot, then 3
    pods of ``slots / 3`` (the Deployment's replicas, each with the same concurrency)."""
    if slots < 1:
        raise ValueError(f"--scaling-slots: {slots} is not a positive number of slots")
    if slots <= WORKERS:
        return slots, 1
    if slots % WORKERS:
        raise ValueError(
            f"--scaling-slots: {slots} slots do not divide over {WORKERS} worker pods; "
            f"allowed: 1 to {WORKERS}, or a multiple of {WORKERS}"
        )
    return WORKERS, slots // WORKERS


#: What the bench changes on top of the twin's own adaptations (twin.ADAPTATIONS),
#: carried in results.json.
BENCH_ADAPTATIONS = {
    "article RabbitMQ image": f"the prod stack with rabbitmq.image = {ARTICLE_RABBITMQ_IMAGE} "
    "(the article's side needs classic mirroring, removed in 4.0); everything else as "
    "the stack renders it for that version",
    "article workers": "the worker Deployment's pods (same image, limits, security "
    "context, env) with the article's command "
    f"`{' '.join(ARTICLE_WORKER_COMMAND)}` (prefork, Celery's default concurrency), "
    "without the Deployment's readiness and liveness probes (the article had none, and "
    "they read a heartbeat file only our app writes), CELERY_BROKER_URLS pointing at "
    "the `article` vhost",
    "article vhost and policy": "vhost `article`, the app user's permissions on it and "
    "the article's ha-all policy, made with rabbitmqctl in pod 0 after boot",
    "publisher pods": "`python -m bench.publish` runs as a pod of the worker Deployment's "
    "template (image, env, limits), restartPolicy Never, no probes, "
    "CELERY_BROKER_ROTATION=0 (both sides' producer on pod 0 first)",
    "measurement env": "TASK_LEDGER on the twin's shared directory (each execution's "
    "start and finish), read by the bench on this host",
    "one-node twins": "the scaling curve's 1-node clusters: each side's stack with "
    "rabbitmq.replicas 1 and environment development (a production stack refuses fewer "
    "than 3 nodes; development only changes RabbitMQ's disk_free_limit here)",
    "scaling workers": "scaling points run 1-3 worker pods with the concurrency the point "
    "needs (ours: CELERY_CONCURRENCY, the article: --concurrency on its command)",
    "ours' remote control": "CELERY_REMOTE_CONTROL=1 on ours' worker pods (shipped: off, "
    "see app/settings.py): the bench pauses and resumes consumers by Celery's remote "
    "control; the article's workers have it on by Celery's default",
    "bench on the host": "remote control (cancel/add consumer), queue checks and the "
    "ledger reading run on this host, reaching the pods by address",
}


@dataclass(frozen=True)
class Config:
    """One side of the comparison."""

    key: str
    title: str
    app: str  # Celery app module the workers and the publisher load
    vhost: str
    queue: str
    pool: str
    concurrency: int
    settings: dict[str, Any]  # what differs, for results.json
    #: Publishes unconfirmed at once (ours: the scheduler Job's, app/pipeline.py).
    publish_window: int = 1


def article_config() -> Config:
    """The article: Celery's defaults (read from Celery, not restated)."""
    from celery.app.defaults import DEFAULTS

    # A worker pod sees this machine's CPUs (a CPU limit does not change the count).
    concurrency = DEFAULTS["worker_concurrency"] or os.cpu_count() or 1
    return Config(
        key="article",
        title="article (ha-all mirrored classic queue, Celery defaults)",
        app="bench.article_app",
        vhost=ARTICLE_VHOST,
        queue=DEFAULTS["task_default_queue"],
        pool=DEFAULTS["worker_pool"],
        concurrency=concurrency,
        settings={
            "celery_app": "bench.article_app (Celery('tasks', broker=URL list))",
            "worker_command": " ".join(ARTICLE_WORKER_COMMAND),
            "policy": f"ha-all '.*' {HA_ALL_POLICY}",
            "queue_type": DEFAULTS["task_default_queue_type"],
            "exchange_type": DEFAULTS["task_default_exchange_type"],
            "task_acks_late": DEFAULTS["task_acks_late"],
            "worker_prefetch_multiplier": DEFAULTS["worker_prefetch_multiplier"],
            "confirm_publish": False,
            "task_publish_retry_policy": DEFAULTS["task_publish_retry_policy"],
            "publish_retry_seconds": None,  # Celery's default policy only
            "broker_url_order": "as listed (pod 0 first for every process)",
            "broker_heartbeat": DEFAULTS["broker_heartbeat"],
            "pool": DEFAULTS["worker_pool"],
            "concurrency": concurrency,
            "concurrency_note": f"Celery's default: the CPU count here ({os.cpu_count()})",
        },
    )


def ours_config(pod_env: Mapping[str, str], command: Sequence[str]) -> Config:
    """This project as shipped: what ``app.celery`` loads in the Deployment's pod 0."""
    from app.settings import celery_config
    from components.config import SchedulerConfig

    shipped = WorkerSettings.from_env(pod_env)
    conf = celery_config(shipped)
    window = SchedulerConfig().publish_window  # the Job's --window, as rendered
    return Config(
        key="ours",
        title="ours (quorum queue, app/settings.py)",
        app="app.celery",
        vhost=urlsplit(shipped.broker_urls[0]).path.lstrip("/"),
        queue=shipped.queue,
        pool=shipped.pool,
        concurrency=shipped.concurrency,
        publish_window=window,
        settings={
            "celery_app": "app.celery (celery_config(WorkerSettings.from_env()))",
            "worker_command": " ".join(command),
            "policy": "quorum-delivery-limit (components/rabbitmq_conf.py definitions)",
            "queue_type": conf["task_default_queue_type"],
            "exchange_type": conf["task_default_exchange_type"],
            "task_acks_late": conf["task_acks_late"],
            "worker_prefetch_multiplier": conf["worker_prefetch_multiplier"],
            "confirm_publish": conf["broker_transport_options"].get("confirm_publish", False),
            "task_publish_retry_policy": conf["task_publish_retry_policy"],
            "publish_retry_seconds": shipped.publish_retry_seconds,
            "publish_window": window,
            "broker_url_order": f"rotated per pod ({ENV_BROKER_ROTATION} unset: by hostname)",
            "broker_heartbeat": conf["broker_heartbeat"],
            "pool": conf["worker_pool"],
            "concurrency": conf["worker_concurrency"],
            "concurrency_note": "the prod stack's workers.concurrency (the Deployment's env)",
        },
    )


def vhost_urls(urls: Sequence[str], vhost: str) -> list[str]:
    """The URLs with another vhost."""
    return [u.rsplit("/", 1)[0] + "/" + quote(vhost, safe="") for u in urls]


def cpu_ticks(pids: Sequence[int]) -> dict[int, int]:
    """User + system CPU ticks of each of these processes so far (/proc/<pid>/stat)."""
    ticks = {}
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks[pid] = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks


def cpu_seconds_since(before: Mapping[int, int], after: Mapping[int, int]) -> float:
    """CPU seconds the processes alive at ``after`` used since ``before`` (a process that
    exited in between, a probe's, is not counted: a slight undercount)."""
    ticks = sum(t - before.get(pid, 0) for pid, t in after.items())
    return ticks / os.sysconf("SC_CLK_TCK")


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


@dataclass
class Side:
    """One configuration on its own twin: the RabbitMQ pods, the URLs, the workers."""

    config: Config
    twin: twin.StatefulSetTwin
    pod_urls: list[str]  # what the pods use (the pods' DNS names)
    host_urls: list[str]  # what the bench on this host uses (the pods' addresses)
    worker_env: dict[str, str]  # extra env of worker and publisher pods
    worker_workload: dict[str, Any] | None  # None: the Deployment as rendered
    boot: dict[str, Any] = field(default_factory=dict)
    workers: list[pods.Pod] = field(default_factory=list)

    @property
    def nodes(self) -> int:
        return len(self.twin.pod_names)

    @property
    def name(self) -> str:
        """``article``, ``ours``; ``article-1node``, ``ours-1node`` for the one-node twins."""
        return self.config.key if self.nodes > 1 else f"{self.config.key}-{self.nodes}node"

    @property
    def max_slots(self) -> int:
        return WORKERS * self.config.concurrency

    def pod(self, ordinal: int) -> pods.Pod:
        return self.twin.pods[self.twin.pod_names[ordinal]]

    def worker_pids(self) -> list[int]:
        return [p for pod in self.workers for p in pod.pids()]

    def rabbit_pids(self) -> list[int]:
        return [p for pod in self.twin.pods.values() for p in pod.pids()]

    def info(self) -> dict[str, Any]:
        """The twin's identity for results.json."""
        spec = rootfs.for_version(self.twin.version)
        return {
            "stack": self.twin.stack,
            "run_id": self.twin.run_id,
            "rabbitmq_image": self.twin.statefulset["spec"]["template"]["spec"]["containers"][0][
                "image"
            ],
            "root": spec.describe(),
            "erlang": spec.pins.get("erlang-base"),
            "adaptations": self.twin.adaptations,
            **self.boot,
        }


@dataclass
class Publisher:
    """A ``python -m bench.publish`` pod and its files (on the twin's shared directory)."""

    name: str
    workdir: Path
    pod: pods.Pod | None = None

    @property
    def ids_file(self) -> Path:
        return self.workdir / f"{self.name}.ids"

    @property
    def result_file(self) -> Path:
        return self.workdir / f"{self.name}.json"

    def ids(self) -> list[str]:
        """Ids published so far (all of them once the pod exited)."""
        return ledger.read_ids(self.ids_file) if self.ids_file.exists() else []


# --------------------------------------------------------------------- the bench
class Bench:
    def __init__(self, args: argparse.Namespace, console: Console) -> None:
        self.args = args
        self.console = console
        self.out = Path(args.out)
        self.logs = self.out / "logs"
        self.sides: dict[str, Side] = {}  # the 3-node twins, by configuration
        self.single: dict[str, Side] = {}  # the 1-node twins (scaling curve), by configuration
        self.opened: dict[str, twin.StatefulSetTwin] = {}  # every twin made, to close
        self.runs: dict[str, list[dict[str, Any]]] = {k: [] for k in CONFIG_KEYS}
        self.checks: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self.versions: dict[str, str] = {}
        self.twins: dict[str, dict[str, Any]] = {}

    def say(self, message: str) -> None:
        self.console.say(message)

    # ------------------------------------------------------------------- setup
    def setup(self) -> None:
        if self.logs.exists():
            shutil.rmtree(self.logs)
        self.logs.mkdir(parents=True)
        for name in ("results.json", "bench.png"):
            with contextlib.suppress(FileNotFoundError):
                (self.out / name).unlink()
        base = stack_config(STACK)["celery-cluster:rabbitmq"]
        article = {**base, "image": ARTICLE_RABBITMQ_IMAGE}
        plan: list[tuple[str, int, dict[str, Any]]] = [
            ("article", 3, {"celery-cluster:rabbitmq": article}),
            ("ours", 3, {}),
        ]
        if self.args.single_node:  # BENCH_ADAPTATIONS["one-node twins"]
            dev = {"celery-cluster:environment": "development"}
            plan += [
                ("article", 1, {**dev, "celery-cluster:rabbitmq": {**article, "replicas": 1}}),
                ("ours", 1, {**dev, "celery-cluster:rabbitmq": {**base, "replicas": 1}}),
            ]
        # Each twin's pods boot while the next is rendered (the render runs the Pulumi
        # program under mocks: ~20-40 s here, most of the setup).
        booting: list[Side] = []
        for key, nodes, overrides in plan:
            what = "as shipped" if key == "ours" else f"with {ARTICLE_RABBITMQ_IMAGE}"
            self.say(f"rendering the {STACK} stack {what} ({key}, {nodes} RabbitMQ node(s))")
            t0 = time.monotonic()
            cluster = twin.StatefulSetTwin(STACK, overrides=overrides or None)
            name = key if nodes > 1 else f"{key}-{nodes}node"
            self.opened[name] = cluster  # closed whatever happens next
            side = self._article_side(cluster) if key == "article" else self._ours_side(cluster)
            (self.sides if nodes > 1 else self.single)[key] = side
            side.boot["render_s"] = round(time.monotonic() - t0, 2)
            self._start_pods(side)
            booting.append(side)
        for side in booting:
            self._wait_clustered(side)
            if side.config.key == "article":
                self._article_vhost(side)
            self.twins[side.name] = side.info()
            self.timings[f"{side.name}_clustered_s"] = side.boot["clustered_s"]

    def _article_vhost(self, side: Side) -> None:
        """The article's vhost, the app user's permissions and the ha-all policy."""
        t0 = time.monotonic()
        user = urlsplit(side.pod_urls[0]).username or ""
        side.twin.rabbitmqctl(0, "add_vhost", ARTICLE_VHOST)
        side.twin.rabbitmqctl(0, "set_permissions", "-p", ARTICLE_VHOST, user, ".*", ".*", ".*")
        side.twin.rabbitmqctl(0, "set_policy", "-p", ARTICLE_VHOST, "ha-all", ".*", HA_ALL_POLICY)
        side.boot["article_vhost_setup_s"] = round(time.monotonic() - t0, 2)

    def _article_side(self, cluster: twin.StatefulSetTwin) -> Side:
        pod_urls = vhost_urls(cluster.broker_urls(), ARTICLE_VHOST)
        workload = twin.without_probes(cluster.deployment, ARTICLE_WORKER_COMMAND)
        return Side(
            config=article_config(),
            twin=cluster,
            pod_urls=pod_urls,
            host_urls=vhost_urls(cluster.broker_urls(by_address=True), ARTICLE_VHOST),
            worker_env={ENV_BROKER_URLS: ",".join(pod_urls)},
            worker_workload=workload,
        )

    def _ours_side(self, cluster: twin.StatefulSetTwin) -> Side:
        deployment = cluster.deployment
        replicas = cluster.worker_replicas()
        if replicas != WORKERS:
            raise twin.TwinError(
                f"stack {STACK}: the worker Deployment has {replicas} replicas, the bench "
                f"compares {WORKERS} workers a side"
            )
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        first = cluster.worker_names()[0]
        env = twin.container_env(
            container, first, deployment["metadata"]["namespace"], cluster.rendered
        )
        return Side(
            config=ours_config({**env, ENV_HOSTNAME: first}, container["command"]),
            twin=cluster,
            pod_urls=cluster.broker_urls(),
            host_urls=cluster.broker_urls(by_address=True),
            # The bench pauses and resumes consumers by remote control, which the
            # shipped workers have off (app/settings.py: a lost node would lock their
            # pidbox queue): on for the bench's own workers only.
            worker_env={ENV_REMOTE_CONTROL: "1"},
            worker_workload=None,
        )

    def _start_pods(self, side: Side) -> None:
        side.boot["started_at"] = time.monotonic()
        for ordinal in range(len(side.twin.pod_names)):
            side.twin.start_pod(ordinal)

    def _wait_clustered(self, side: Side, timeout: float = 300) -> None:
        ready = side.twin.wait_ready(timeout)
        side.boot["pods_ready_s"] = {name: round(s, 2) for name, s in ready.items()}
        self.wait_whole(side, timeout)
        side.boot["clustered_s"] = round(time.monotonic() - side.boot.pop("started_at"), 2)
        version = side.twin.rabbitmqctl(0, "version").strip()
        if side.nodes > 1:
            self.versions[side.config.key] = version
        self.say(
            f"{side.name}: RabbitMQ {version}, {side.nodes} pods clustered "
            f"{side.boot['clustered_s']} s after their start (twin {side.twin.run_id})"
        )

    def wait_whole(self, side: Side, timeout: float) -> None:
        """Until every pod lists every node as running."""
        try:
            side.twin.wait_clustered(timeout)
        except twin.TwinError as error:
            raise TimeoutError(f"{side.config.key}: {error}") from error

    # -------------------------------------------------------------------- runs
    def execute(self) -> None:
        self.setup()
        total = self.args.runs
        for run in range(1, total + 1):
            for key in CONFIG_KEYS:
                self.runs[key].append(self.one_run(self.sides[key], run, total))

    def _python_pod(
        self, side: Side, workload: Mapping[str, Any], name: str, env: Mapping[str, str]
    ) -> pods.Pod:
        """A pod of ``workload`` on the side's twin (removed by the twin's close too)."""
        cluster = side.twin
        files = cluster.files(name)
        spec = twin.python_pod(cluster.rendered, workload, name, files, cluster.hosts, env)
        pod = pods.Pod(spec, cluster.network, files.pod_dir)
        cluster.extra_pods[name] = pod
        pod.start()
        return pod

    def start_workers(self, side: Side, env: Mapping[str, str], slots: int | None = None) -> None:
        """The side's worker pods; with ``slots``, as many pods and as much concurrency as
        :func:`slot_layout` says (else the Deployment's replicas and concurrency)."""
        names = side.twin.worker_names()
        workload = side.worker_workload
        env = dict(env)
        if slots is not None:
            replicas, concurrency = slot_layout(slots)
            names = names[:replicas]
            if workload is None:  # ours: the Deployment's pod, its concurrency from the env
                env[ENV_CONCURRENCY] = str(concurrency)
            else:  # the article's command line
                command = (*ARTICLE_WORKER_COMMAND, f"--concurrency={concurrency}")
                workload = twin.without_probes(side.twin.deployment, command)
        for name in names:
            if workload is None:  # ours: the Deployment's pod as rendered
                pod = side.twin.start_worker(name, env)
            else:
                pod = self._python_pod(side, workload, name, env)
            side.workers.append(pod)

    def remove_pod(self, side: Side, name: str, workdir: Path) -> None:
        """Delete a worker or publisher pod, its log kept in the run's log directory."""
        pod = side.twin.extra_pods.pop(name, None)
        if pod is None:
            return
        with contextlib.suppress(OSError):
            shutil.copyfile(pod.log_file(), workdir / f"{name}.log")
        pod.remove()

    def one_run(self, side: Side, run: int, total: int) -> dict[str, Any]:
        args = self.args
        cfg = side.config
        where = f"run {run}/{total} {cfg.key}"
        shared = side.twin.shared_dir(f"run{run}")
        workdir = self.logs / f"run{run}-{cfg.key}"
        workdir.mkdir(parents=True, exist_ok=True)
        result: dict[str, Any] = {"run": run}
        tail = LedgerTail(shared / "ledger.jsonl")
        single = self.single.get(cfg.key)
        other = [s for s in (*self.sides.values(), *self.single.values()) if s is not side]
        idle_before = cpu_ticks([p for s in other for p in s.rabbit_pids()])
        started = time.monotonic()
        env = {**side.worker_env, "TASK_LEDGER": str(tail.path)}
        try:
            self.delete_queue(side)
            # The workers first, told to stop consuming: publishing meets no consumer,
            # and the drain starts on all three at once.
            self.say(f"{where}: start {WORKERS} worker pods ({cfg.pool} x {cfg.concurrency})")
            t0 = time.monotonic()
            self.start_workers(side, env)
            self.wait_consumers(side, WORKERS, args.timeout)
            result["workers_ready_s"] = round(time.monotonic() - t0, 2)
            self.set_consuming(side, False)

            # 1. publish, nobody consuming
            self.say(f"{where}: publish {args.publish_tasks} no-op tasks, no worker consuming")
            broker_before = cpu_ticks(side.rabbit_pids())
            pub = self.publish(side, "publish", args.publish_tasks, 0.0, 0.0, shared, where)
            broker_cpu = cpu_seconds_since(broker_before, cpu_ticks(side.rabbit_pids()))
            ids = set(pub["ids"])
            result["publish"] = {k: v for k, v in pub.items() if k != "ids"}
            result["publish"]["broker_cpu_s"] = broker_cpu
            result["publish_rate"] = pub["rate"]
            result["publish_broker_cpu_per_1000"] = per_1000(broker_cpu, pub["published"])
            result["publish_client_cpu_per_1000"] = per_1000(pub.get("cpu_s"), pub["published"])
            result["publish"]["queue_depth"] = self.queue_depth(side, len(ids))
            if run == 1:
                self.checks[cfg.key] = self.check_queue(side)
            # The same with publisher confirms switched (and nothing else): what
            # they cost, apart from the queue type.
            toggled = "on" if not cfg.settings["confirm_publish"] else "off"
            self.say(
                f"{where}: publish {args.publish_tasks} more with publisher confirms {toggled}"
            )
            pub2 = self.publish(
                side, "publish-toggled", args.publish_tasks, 0.0, 0.0, shared, where, toggled
            )
            result["publish_toggled"] = {k: v for k, v in pub2.items() if k != "ids"}
            result["publish_rate_confirms_toggled"] = pub2["rate"]
            ids |= set(pub2["ids"])
            result["publish_toggled"]["queue_depth"] = self.queue_depth(side, len(ids))

            # 2. drain: the workers on the full queue
            self.say(f"{where}: drain: {WORKERS} workers consume again")
            result["drain"] = self.drain(side, tail, ids, where, "drain")
            result["drain_rate"] = result["drain"]["rate"]
            result["drain_broker_cpu_per_1000"] = result["drain"]["broker_cpu_per_1000"]
            result["drain_worker_cpu_per_1000"] = result["drain"]["worker_cpu_per_1000"]

            # 3. the article's workload shape, on the idle workers
            slots = side.max_slots
            sleep_tasks = self.sleep_tasks(side)
            ideal = sleep_tasks * args.sleep_seconds / slots
            self.say(
                f"{where}: {sleep_tasks} tasks x {args.sleep_seconds} s on {slots} slots "
                f"(ideal {ideal:.2f} s)"
            )
            step = args.sleep_seconds / COUNT_STEPS
            sleep_pub = self.start_publisher(side, "sleep", sleep_tasks, step, 0.0, shared)
            self.console.show(lambda: self._line(side, where, "sleep", tail, set(sleep_pub.ids())))
            sleep_done = self.finish_publish(side, sleep_pub, where)
            sleep_ids = set(sleep_done["ids"])
            self.wait_all(tail, sleep_ids, args.timeout + ideal, f"{where} sleep")
            events = read_events(tail.path)
            finishes = [e.ts for e in events if e.event == ledger.FINISH and e.task_id in sleep_ids]
            starts = [e.ts for e in events if e.event == ledger.START and e.task_id in sleep_ids]
            # One start and finish per task: the first execution's (a redelivered task
            # would count twice, and none is expected on a healthy cluster).
            first_start = {e.task_id: e.ts for e in reversed(events) if e.event == ledger.START}
            first_finish = {e.task_id: e.ts for e in reversed(events) if e.event == ledger.FINISH}
            usage = slot_usage(
                sleep_done["started"],
                [first_start[t] for t in sleep_ids],
                [first_finish[t] for t in sleep_ids],
                slots,
                args.sleep_seconds,
            )
            drain_s = usage["drain_s"]
            result["sleep_drain_s"] = drain_s
            result["sleep_ideal_s"] = ideal
            result["sleep_over_ideal"] = usage["over_ideal"]
            result["sleep"] = {
                **usage,
                "scaled_from": args.sleep_tasks,
                "pool": cfg.pool,
                "concurrency_per_worker": cfg.concurrency,
                "first_start_to_last_finish_s": max(finishes) - min(starts),
                "publish_s": sleep_done["elapsed_s"],
                "efficiency": ideal / drain_s if drain_s > 0 else None,
                "executions": len(starts),
            }

            # 4. failover
            result["failover"] = self.failover(side, shared, tail, where)
            for key in ("lost", "duplicates", "gap_s"):
                result[f"failover_{key}"] = result["failover"][key]
        finally:
            self.console.show(None)
            for name in [PUBLISHER_POD, *(w.name for w in side.workers)]:
                self.remove_pod(side, name, workdir)
            side.workers = []
            with contextlib.suppress(OSError):
                shutil.copytree(shared, workdir, dirs_exist_ok=True)
        self.delete_queue(side)
        # 5. the scaling curve: no-op drains on fewer slots, then on the 1-node twin; the
        # point at the most slots on 3 nodes is the drain phase's.
        result["scaling"] = [
            self.drain_point(side, slots, run, where) for slots in self.slot_points(side)
        ]
        result["scaling"].append(
            {
                "nodes": side.nodes,
                "slots": side.max_slots,
                "pods": WORKERS,
                "concurrency": cfg.concurrency,
                "pool": cfg.pool,
                "publish_rate": result["publish_rate"],
                "phase": "drain",
                **result["drain"],
            }
        )
        if single is not None:
            result["scaling"].append(self.drain_point(single, single.max_slots, run, where))
        result["seconds"] = round(time.monotonic() - started, 1)
        # What the other twin's idle RabbitMQ pods took from the CPUs meanwhile.
        idle_after = cpu_ticks([p for s in other for p in s.rabbit_pids()])
        result["idle_twin_cpu_s"] = round(cpu_seconds_since(idle_before, idle_after), 2)
        self.say(
            f"{where}: publish {_f(result['publish_rate'])}/s, drain {_f(result['drain_rate'])}/s, "
            f"sleep {_f(result['sleep_drain_s'])} s (ideal {_f(result['sleep_ideal_s'])}), "
            f"failover lost {result['failover_lost']}, ran twice {result['failover_duplicates']}, "
            f"gap {_f(result['failover_gap_s'])} s; the idle twin used "
            f"{result['idle_twin_cpu_s']} CPU s in {result['seconds']} s"
        )
        return result

    def sleep_tasks(self, side: Side) -> int:
        """``--sleep-tasks`` for the side with the most slots; the others as many fewer as
        they have fewer slots, so every side's ideal drain time is the same (the
        article's 6 prefork slots would take 16x longer on 10,000 tasks)."""
        most = max(s.max_slots for s in self.sides.values())
        return max(1, round(self.args.sleep_tasks * side.max_slots / most))

    def slot_points(self, side: Side) -> list[int]:
        """The scaling points to measure: below the side's most slots (the drain phase
        measures that one)."""
        return [n for n in self.args.scaling_slots if n < side.max_slots]

    def drain(
        self, side: Side, tail: LedgerTail, ids: set[str], where: str, what: str
    ) -> dict[str, Any]:
        """The side's workers consume again, all at once: until every id completed. The
        rate, and the CPU seconds RabbitMQ's and the workers' processes spent meanwhile
        (their own accounting, /proc/<pid>/stat)."""
        self.console.show(lambda: self._line(side, where, what, tail, ids))
        broker_before, workers_before = cpu_ticks(side.rabbit_pids()), cpu_ticks(side.worker_pids())
        drain_from = time.time()
        self.set_consuming(side, True)
        self.wait_all(tail, ids, self.args.timeout, f"{where} {what}")
        broker_cpu = cpu_seconds_since(broker_before, cpu_ticks(side.rabbit_pids()))
        worker_cpu = cpu_seconds_since(workers_before, cpu_ticks(side.worker_pids()))
        self.console.show(None)
        events = read_events(tail.path)
        last = max(e.ts for e in events if e.event == ledger.FINISH and e.task_id in ids)
        drain_s = last - drain_from
        return {
            "tasks": len(ids),
            "drain_s": drain_s,
            "rate": len(ids) / drain_s,
            "broker_cpu_s": broker_cpu,
            "worker_cpu_s": worker_cpu,
            "broker_cpu_per_1000": per_1000(broker_cpu, len(ids)),
            "worker_cpu_per_1000": per_1000(worker_cpu, len(ids)),
        }

    def drain_point(self, side: Side, slots: int, run: int, where: str) -> dict[str, Any]:
        """One point of the scaling curve: ``--scaling-tasks`` no-op tasks published
        while no worker consumes, then drained by ``slots`` worker slots."""
        n = self.args.scaling_tasks
        replicas, concurrency = slot_layout(slots)
        label = f"scale-{side.nodes}node-{slots}slots"
        where = f"{where} {label}"
        shared = side.twin.shared_dir(f"run{run}-{label}")
        workdir = self.logs / f"run{run}-{side.config.key}" / label
        workdir.mkdir(parents=True, exist_ok=True)
        tail = LedgerTail(shared / "ledger.jsonl")
        try:
            self.delete_queue(side)
            self.say(f"{where}: {replicas} worker pods x {concurrency}, {n} no-op tasks")
            self.start_workers(side, {**side.worker_env, "TASK_LEDGER": str(tail.path)}, slots)
            self.wait_consumers(side, replicas, self.args.timeout)
            self.set_consuming(side, False)
            pub = self.publish(side, "scale", n, 0.0, 0.0, shared, where)
            ids = set(pub["ids"])
            self.queue_depth(side, len(ids))
            drained = self.drain(side, tail, ids, where, label)
        finally:
            self.console.show(None)
            for name in [PUBLISHER_POD, *(w.name for w in side.workers)]:
                self.remove_pod(side, name, workdir)
            side.workers = []
        self.delete_queue(side)
        self.say(
            f"{where}: {drained['rate']:.0f} tasks/s; CPU s per 1,000 tasks: broker "
            f"{drained['broker_cpu_per_1000']:.2f}, workers {drained['worker_cpu_per_1000']:.2f}"
        )
        return {
            "nodes": side.nodes,
            "slots": slots,
            "pods": replicas,
            "concurrency": concurrency,
            "pool": side.config.pool,
            "publish_rate": pub["rate"],
            **drained,
        }

    def failover(self, side: Side, shared: Path, tail: LedgerTail, where: str) -> dict[str, Any]:
        args = self.args
        n = args.failover_tasks
        self.say(
            f"{where}: failover: {n} tasks of {args.failover_task_seconds} s at "
            f"{args.failover_rate}/s; SIGKILL worker pod 0's RabbitMQ pod after "
            f"{math.ceil(n * args.fault_at)} completions"
        )
        pub = self.start_publisher(
            side,
            "failover",
            n,
            args.failover_task_seconds / COUNT_STEPS,
            args.failover_rate,
            shared,
        )
        phase = {"text": "running"}
        self.console.show(
            lambda: self._line(side, where, f"failover {phase['text']}", tail, set(pub.ids()))
        )

        def completed() -> int:
            tail.poll()
            ids = pub.ids()
            return len(ids) - len(tail.missing(ids))

        target = max(1, math.ceil(n * args.fault_at))
        deadline = time.monotonic() + args.timeout
        while completed() < target:
            if pub.pod is not None and not pub.pod.running():
                break  # published everything already; kill anyway
            if time.monotonic() > deadline:
                raise TimeoutError(f"{where}: fewer than {target} completions in time")
            time.sleep(0.05)
        victim = side.workers[0]
        ordinals = side.twin.connected_ordinals(victim.pid or 0, AMQP_PORT)
        node = ordinals[0] if ordinals else 0
        detail: dict[str, Any] = {
            "tasks": n,
            "rate": args.failover_rate,
            "task_seconds": args.failover_task_seconds,
            "killed_pod": side.twin.pod_names[node],
            "found_by": f"{victim.name}'s AMQP connection" if ordinals else "default (pod 0)",
            "completed_at_kill": completed(),
        }
        phase["text"] = f"{side.twin.pod_names[node]} DOWN"
        kill_at = time.time()
        side.pod(node).kill()
        self.say(f"{where}: SIGKILLed {side.twin.pod_names[node]} ({victim.name} used it)")
        time.sleep(args.down_seconds)
        phase["text"] = f"{side.twin.pod_names[node]} restarting"
        t0 = time.monotonic()
        side.twin.start_pod(node).wait_ready(args.timeout)
        detail["ready_s"] = round(time.monotonic() - t0, 2)
        self.wait_whole(side, args.timeout)
        detail["rejoin_s"] = round(time.monotonic() - t0, 2)
        detail["down_s"] = round(time.time() - kill_at, 2)
        phase["text"] = "after the fault"
        done = self.finish_publish(side, pub, where, timeout=args.timeout)
        ids = set(done["ids"])
        settled = self.wait_all(tail, ids, args.timeout, f"{where} failover", settle=args.settle)
        summary = ledger.read_ledger(tail.path)
        counts = summary.report(ids)
        events = read_events(tail.path)
        finishes = sorted(e.ts for e in events if e.event == ledger.FINISH and e.task_id in ids)
        gap, gap_start = longest_gap(finishes)
        lost_ids = sorted(summary.lost(ids))
        # When each lost task was due to be published (paced: start + index / rate;
        # a publish that stalled went out later), relative to the kill.
        order = {t: i for i, t in enumerate(done["ids"])}
        lost_at = sorted(
            round(done["started"] + order[t] / args.failover_rate - kill_at, 2) for t in lost_ids
        )
        detail.update(
            published=len(ids),
            publish_failed=done["failed"],
            publish_errors=done["errors"],
            completed=counts["completed"],
            lost=counts["lost"],
            lost_ids=lost_ids[:20],
            lost_due_s_after_kill=lost_at[:20],
            duplicates=len({t for t in summary.duplicates if t in ids}),
            extra_executions=sum(n - 1 for t, n in summary.duplicates.items() if t in ids),
            gap_s=gap,
            gap_start_after_kill_s=None if gap_start is None else round(gap_start - kill_at, 2),
            waited_for_all=settled,
        )
        if counts["lost"]:
            self.say(f"{where}: {counts['lost']} published tasks never ran")
        return detail

    # ------------------------------------------------------------- publishers
    def start_publisher(
        self,
        side: Side,
        name: str,
        n: int,
        step: float,
        rate: float,
        shared: Path,
        confirms: str = "as-configured",
    ) -> Publisher:
        """Start a ``python -m bench.publish`` pod (not waited for)."""
        pub = Publisher(name, shared)
        command = [
            "python",
            "-m",
            "bench.publish",
            "--config",
            side.config.key,
            "--tasks",
            str(n),
            "--task-seconds",
            repr(step),
            "--rate",
            repr(rate),
            "--ids-file",
            str(pub.ids_file),
            "--result-file",
            str(pub.result_file),
            "--confirms",
            confirms,
            # Pipelining needs confirms; a run with them switched off publishes plainly.
            "--window",
            str(side.config.publish_window if confirms != "off" else 1),
        ]
        workload = twin.without_probes(side.twin.deployment, command)
        workload["spec"]["template"]["spec"]["restartPolicy"] = "Never"  # a Job's pod
        env = {**side.worker_env, ENV_BROKER_ROTATION: "0"}
        pub.pod = self._python_pod(side, workload, PUBLISHER_POD, env)
        return pub

    def publish(
        self,
        side: Side,
        name: str,
        n: int,
        step: float,
        rate: float,
        shared: Path,
        where: str,
        confirms: str = "as-configured",
    ) -> dict[str, Any]:
        """Publish and wait for the publisher: its result."""
        pub = self.start_publisher(side, name, n, step, rate, shared, confirms)
        return self.finish_publish(side, pub, where)

    def finish_publish(
        self, side: Side, pub: Publisher, where: str, timeout: float = 600
    ) -> dict[str, Any]:
        """Wait for a publisher pod; its result, with the ids it published."""
        assert pub.pod is not None
        code = pub.pod.wait_exit(timeout)
        if code != 0 or not pub.result_file.exists():
            raise RuntimeError(f"{where}: publisher pod exited with {code}:\n{pub.pod.tail()}")
        with contextlib.suppress(OSError):
            shutil.copyfile(pub.pod.log_file(), pub.workdir / f"{pub.name}-publisher.log")
        side.twin.extra_pods.pop(PUBLISHER_POD).remove()
        result: dict[str, Any] = json.loads(pub.result_file.read_text())
        result["ids"] = pub.ids()
        return result

    # ---------------------------------------------------------------- waiting
    def wait_all(
        self,
        tail: LedgerTail,
        ids: set[str],
        timeout: float,
        what: str,
        settle: float | None = None,
    ) -> bool:
        """Until every id completed.  With ``settle``: or until nothing completed
        for ``settle`` seconds (tasks can be lost), returning False."""
        deadline = time.monotonic() + timeout
        last_count, last_change = -1, time.monotonic()
        while True:
            tail.poll()
            missing = len(tail.missing(ids))
            if missing == 0:
                return True
            now = time.monotonic()
            if missing != last_count:
                last_count, last_change = missing, now
            if settle is not None and now - last_change > settle:
                self.say(
                    f"{what}: {missing} tasks still missing after {settle:.0f} s without progress"
                )
                return False
            if now > deadline:
                if settle is not None:
                    return False
                raise TimeoutError(
                    f"{what}: {missing} of {len(ids)} tasks not done after {timeout:.0f} s"
                )
            time.sleep(0.1)

    def _line(self, side: Side, where: str, phase: str, tail: LedgerTail, ids: set[str]) -> str:
        tail.poll()
        done = len(ids) - len(tail.missing(ids))
        up = sum(pod.running() for pod in side.twin.pods.values())
        return (
            f"        {where} {phase}: {done}/{len(ids)} completed, "
            f"{tail.rate(time.time()):.0f}/s, RabbitMQ pods up {up}/{len(side.twin.pod_names)}"
        )

    # ------------------------------------------------------------------ broker
    def _connection(self, side: Side) -> Connection:
        return Connection(side.host_urls, connect_timeout=5, failover_strategy="round-robin")

    def set_consuming(self, side: Side, on: bool, timeout: float = 60) -> None:
        """Every worker stops (or starts again) consuming from the queue: Celery's
        remote control (``cancel_consumer`` / ``add_consumer``, broadcast), repeated
        until the queue's consumer count says every worker did it."""
        cfg = side.config
        want = len(side.workers) if on else 0
        replies: Any = None
        deadline = time.monotonic() + timeout
        while True:
            control = Celery(
                f"bench-control-{cfg.key}", broker=side.host_urls, set_as_current=False
            )
            try:
                command = control.control.add_consumer if on else control.control.cancel_consumer
                replies = command(cfg.queue, reply=True, timeout=5)
            except OSError as exc:
                # Seen on 3.10.8, first broadcast of a run after a node restart: the
                # connection is reset while the reply queue, same name as an earlier
                # broadcast's, is redeclared.  The next one works.
                log.info("remote control via %s failed (%r); retrying", cfg.key, exc)
            finally:
                control.close()
            with contextlib.suppress(TimeoutError):
                self.wait_consumers(side, want, 5)
                return
            # Seen with ours under load: no reply at all from workers whose queue
            # consumer was already up (their remote-control consumer was not yet):
            # the broadcast went nowhere. Cancelling or adding twice is harmless.
            self.timings["remote_control_retries"] = (
                self.timings.get("remote_control_retries", 0) + 1
            )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{cfg.key}: {self.consumers(side)} consumers on {cfg.queue} after "
                    f"{timeout:.0f} s of remote control, expected {want} (last replies: {replies})"
                )

    def wait_consumers(self, side: Side, want: int, timeout: float) -> None:
        """Until the queue has ``want`` consumers (a worker declares it when it starts)."""
        deadline = time.monotonic() + timeout
        while (count := self.consumers(side)) != want:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{side.config.key}: {count} consumers on {side.config.queue} after "
                    f"{timeout:.0f} s, expected {want}"
                )
            time.sleep(0.1)

    def consumers(self, side: Side) -> int:
        """Consumers of the queue (0 while no worker has declared it yet)."""
        with self._connection(side) as conn:
            channel = conn.channel()
            try:
                return int(channel.queue_declare(side.config.queue, passive=True).consumer_count)
            except conn.channel_errors:  # 404: not declared yet
                return 0
            finally:
                with contextlib.suppress(Exception):
                    channel.close()

    def queue_depth(self, side: Side, expected: int, timeout: float = 10) -> int | None:
        """Messages in the queue (passive declare), waiting up to ``timeout`` for
        ``expected`` (an unconfirmed publish can still be on its way)."""
        deadline = time.monotonic() + timeout
        depth: int | None = None
        with self._connection(side) as conn:
            channel = conn.channel()
            try:
                while True:
                    depth = channel.queue_declare(side.config.queue, passive=True).message_count
                    if depth >= expected or time.monotonic() > deadline:
                        return depth
                    time.sleep(0.1)
            finally:
                with contextlib.suppress(Exception):
                    channel.close()

    def delete_queue(self, side: Side) -> None:
        """Start each run from nothing: no leftover (or lost-then-found) message."""
        with self._connection(side) as conn:
            channel = conn.channel()
            try:
                channel.queue_delete(side.config.queue)
            finally:
                with contextlib.suppress(Exception):
                    channel.close()

    def check_queue(self, side: Side) -> dict[str, Any]:
        """What RabbitMQ says the queue is: type, policy, replicas."""
        cfg = side.config
        cols = ["name", "type", "policy", "messages"]
        cols += ["slave_pids", "synchronised_slave_pids"] if cfg.key == "article" else ["members"]
        out = side.twin.rabbitmqctl(0, "list_queues", "-p", cfg.vhost, *cols, "--formatter", "json")
        rows = json.loads(out[out.index("[") :])
        row: dict[str, Any] = next((r for r in rows if r.get("name") == cfg.queue), {})
        self.say(f"{cfg.key}: queue {cfg.vhost}/{cfg.queue}: {json.dumps(row)}")
        return {"vhost": cfg.vhost, **row}

    # ------------------------------------------------------------------ close
    def close(self, failed: bool) -> list[str]:
        """Remove both twins (pods, namespaces, bridges, cgroups, directories) and
        report anything still there."""
        problems: list[str] = []
        closers = [
            threading.Thread(target=self._close_twin, args=(key, cluster, problems))
            for key, cluster in self.opened.items()
        ]
        for closer in closers:  # both at once: a SIGKILLed pod goes in ~1 s, but 6 of them
            closer.start()
        for closer in closers:
            closer.join()
        return problems

    def _close_twin(self, key: str, cluster: twin.StatefulSetTwin, problems: list[str]) -> None:
        try:
            cluster.close()
        except Exception as exc:  # report it, and still check what is left
            problems.append(f"{key} twin {cluster.run_id}: {exc}")
        left = {k: v for k, v in cluster.leftovers().items() if v}
        self.twins.setdefault(key, {"run_id": cluster.run_id})["leftovers"] = left
        if left:
            problems.append(f"{key} twin {cluster.run_id} left {left}")


# ------------------------------------------------------------------------- CLI
def slot_counts(raw: str) -> list[int]:
    """``--scaling-slots``: comma-separated slot counts :func:`slot_layout` accepts."""
    try:
        counts = sorted({int(part) for part in raw.split(",")})
        for n in counts:
            slot_layout(n)
    except ValueError as error:
        detail = str(error) if "--scaling-slots" in str(error) else f"not integers: {raw!r}"
        raise argparse.ArgumentTypeError(detail) from None
    return counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "The article's configuration (ha-all mirrored classic queue, Celery defaults) "
            "on RabbitMQ 3.10 pods against this project's (quorum queue, app/settings.py) on "
            "RabbitMQ 4.3 pods as shipped, both pod twins of the prod stack on this machine: "
            "publish rate, drain rate, a RabbitMQ pod SIGKILLed mid-run (lost, duplicates, "
            "failover gap) and the article's sleeping workload. Writes results.json and "
            "bench.png to --out and prints a table."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--runs", type=positive_int, default=3, help="runs per configuration (medians, min-max)")
    add(
        "--publish-tasks",
        type=positive_int,
        default=5000,
        help="no-op tasks published, then drained",
    )
    add(
        "--sleep-tasks",
        type=positive_int,
        default=10_000,
        help="tasks of the sleeping workload, as the article queued, for the side with the "
        "most slots (ours); a side with fewer slots runs proportionally fewer",
    )
    add(
        "--sleep-seconds",
        type=non_negative_float,
        default=0.5,
        help="how long each sleeps, in 10 steps (the article: 10 x 1 s)",
    )
    add(
        "--scaling-slots",
        type=slot_counts,
        default=",".join(map(str, DEFAULT_SCALING_SLOTS)),
        help="worker slots of the scaling curve's points (1-3, or multiples of 3), each side "
        "up to 3 x its per-pod concurrency",
    )
    add(
        "--scaling-tasks",
        type=positive_int,
        default=2000,
        help="no-op tasks per scaling point",
    )
    add(
        "--no-single-node",
        dest="single_node",
        action="store_false",
        help="skip the 1-node twins (the scaling curve's cluster-size points)",
    )
    add(
        "--failover-tasks",
        type=positive_int,
        default=600,
        help="tasks published during the RabbitMQ pod kill",
    )
    add("--failover-rate", type=positive_float, default=40.0, help="their publish rate (tasks/s)")
    add("--failover-task-seconds", type=non_negative_float, default=0.1, help="how long each runs")
    add(
        "--fault-at",
        type=fraction,
        default=argparse.SUPPRESS,
        help="kill once this fraction of the failover tasks completed (default: 1/3)",
    )
    add(
        "--down-seconds",
        type=non_negative_float,
        default=5.0,
        help="RabbitMQ pod down this long, then a new one started on its volume",
    )
    add(
        "--settle",
        type=positive_float,
        default=20.0,
        help="failover: stop waiting after this long without a completion (tasks may be lost)",
    )
    add("--timeout", type=positive_float, default=300.0, help="give up a phase after this long")
    add("--out", default="out/bench", help="output directory")
    add("-v", "--verbose", action="store_true", help="log the pods' steps")
    args = parser.parse_args(argv)
    if not hasattr(args, "fault_at"):  # SUPPRESS: shown as 1/3 in --help, not 0.333...
        args.fault_at = 1 / 3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    console = Console("bench")
    bench = Bench(args, console)
    started = time.time()
    outcome = run_guarded(bench.execute, bench.close, console)
    results = build_results(
        args=args,
        argv=sys.argv[1:] if argv is None else argv,
        status=outcome.status,
        problems=outcome.problems,
        configs={k: s.config.settings | {"title": s.config.title} for k, s in bench.sides.items()},
        runs=bench.runs,
        checks=bench.checks,
        timings=bench.timings | {"total_s": round(time.time() - started, 1)},
        rabbitmq_versions=bench.versions,
        twins=bench.twins,
        bench_adaptations=BENCH_ADAPTATIONS,
    )
    bench.out.mkdir(parents=True, exist_ok=True)
    (bench.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if any(bench.runs.values()):
        plot_results(bench.out / "bench.png", results)
    print(format_table(results))
    console.say(f"wrote {bench.out / 'results.json'} and {bench.out / 'bench.png'}")
    if outcome.exit_interrupted:
        return 130
    return 2 if outcome.problems else 0
