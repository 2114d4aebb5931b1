"""The pods of one ``python -m localcluster`` run, as its faults and its report use them.

:class:`RabbitPods` (the RabbitMQ StatefulSet's pods) and :class:`PodWorkers` (the
worker Deployment's pods and the scheduler Job's pod) are views of one
:class:`~localcluster.twin.StatefulSetTwin` of the prod stack: the run's options
become the stack config the program renders (worker replicas and concurrency, the
scheduler Job's tasks), so the pods are the program's own.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from components.rabbitmq import SKIP_PRESTOP_LABEL
from localcluster import pods, rootfs, twin
from tools.mockrun import stack_config

STACK = "prod"
AMQP_PORT = 5672


def overrides(
    stack: str, *, workers: int, concurrency: int, tasks: int, task_seconds: float
) -> dict[str, Any]:
    """The run's options as the stack config `pulumi config set` would write; with KEDA
    in the stack, its floor is the run's worker count (the pods the twin starts)."""
    config = stack_config(stack)
    base = config["celery-cluster:workers"]
    found: dict[str, Any] = {
        "celery-cluster:workers": {
            **base,
            "replicas": workers,
            "concurrency": concurrency,
            "scheduler": {"enabled": True, "tasks": tasks, "taskSeconds": task_seconds},
        }
    }
    scaling = config.get("celery-cluster:autoscaling")
    if scaling is not None and scaling.get("keda", "install") != "none":
        found["celery-cluster:autoscaling"] = {
            **scaling,
            "minReplicas": workers,
            "maxReplicas": max(workers, int(scaling.get("maxReplicas", workers))),
        }
    return found


class RabbitPods:
    """The RabbitMQ StatefulSet's pods: start, stop, kill, replace, ask who is clustered."""

    def __init__(self, cluster: twin.StatefulSetTwin) -> None:
        self.twin = cluster
        self.run_id = cluster.run_id
        self.node_names = list(cluster.pod_names)
        self.timings: dict[str, float] = {}
        self.version = rootfs.for_version(cluster.version).upstream_version

    def _pod(self, i: int) -> pods.Pod:
        return self.twin.pods[self.node_names[i]]

    def start(self, timeout: float = 300) -> None:
        begin = time.monotonic()
        self.twin.start(timeout)
        self.wait_clustered(timeout)
        self.timings["clustered"] = time.monotonic() - begin

    def address(self, i: int) -> str:
        return self.twin.address(i)

    def network_namespace(self, i: int) -> str:
        return self._pod(i).netns

    def erlang_node(self, i: int) -> str:
        """The node's Erlang name, as the rendered StatefulSet sets it (RABBITMQ_NODENAME)."""
        return dict(self._pod(i).spec.container.env)["RABBITMQ_NODENAME"]

    def log(self, i: int) -> str:
        """Pod ``i``'s whole RabbitMQ log ("" once the pod is gone)."""
        try:
            return self._pod(i).log_file().read_text(errors="replace")
        except OSError:
            return ""

    def memory(self, i: int) -> dict[str, int]:
        """Pod ``i``'s container pid, restarts, OOM kills and resident memory now."""
        pod = self._pod(i)
        return {
            "pid": pod.pid or 0,
            "restarts": pod.restarts,
            "oom_kills": pod.oom_kills(),
            "rss": pod.memory_rss(),
        }

    def memory_limit(self, i: int) -> int:
        """Pod ``i``'s memory limit in bytes (the StatefulSet's, as its cgroup has it)."""
        limit = self._pod(i).spec.memory_limit
        if limit is None:
            raise ValueError(f"pod {self.node_names[i]} has no memory limit")
        return limit

    def memory_alarm_threshold(self, i: int) -> int:
        """The bytes at which pod ``i``'s RabbitMQ raises its memory alarm (its own figure:
        the watermark of the memory the rendered rabbitmq.conf says it has)."""
        out = self.twin.rabbitmqctl(i, "eval", "vm_memory_monitor:get_memory_limit().")
        return int(out.strip())

    def freeze(self, i: int) -> None:
        self._pod(i).freeze()

    def thaw(self, i: int) -> None:
        self._pod(i).thaw()

    def empty_volume(self, i: int) -> None:
        """Pod ``i``'s PersistentVolumeClaims emptied (a deleted PVC, a replaced disk)."""
        for claim in self.twin.files(self.node_names[i]).pvc_dir.iterdir():
            for entry in claim.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    pods.remove_tree(entry)
                else:
                    entry.unlink()

    def queue_leader(self, queue: str, vhost: str, ask: int) -> int | None:
        """The ordinal of the pod leading quorum queue ``vhost/queue``, asked of pod ``ask``."""
        out = self.twin.rabbitmqctl(
            ask, "list_queues", "-p", vhost, "name", "leader", "--formatter", "json"
        )
        rows = json.loads(out[out.index("[") :])
        leader = next((r.get("leader") for r in rows if r.get("name") == queue), None)
        for i in range(len(self.node_names)):
            if self.erlang_node(i) == leader:
                return i
        return None

    def is_running(self, i: int) -> bool:
        name = self.node_names[i]
        return name in self.twin.pods and self.twin.pods[name].running()

    def stop_node(self, i: int, graceful: bool = True, timeout: float = 60) -> None:
        pod = self._pod(i)
        if graceful:
            pod.stop()
        else:
            pod.kill()

    def start_node(self, i: int, timeout: float = 240) -> None:
        """A new pod on the same PVC directory; returns once the cluster is whole."""
        self.twin.start_pod(i).wait_ready(timeout)
        self.wait_clustered(timeout)

    def stop_nodes(self, indices: list[int] | None = None, graceful: bool = True) -> None:
        """Stop pods at once. Stopping them ALL gracefully, they are labelled
        skipPreStopChecks first, as the Cluster Operator documents (and `make destroy`
        does): each preStop waits for quorum+1 nodes online, which pods draining beside
        it never are again, so the last one waited out its whole timeout (minutes)."""
        if graceful and (indices is None or len(indices) == len(self.node_names)):
            for i in range(len(self.node_names)):
                self.twin.set_label(i, SKIP_PRESTOP_LABEL, "true")
        threads = [
            threading.Thread(target=self.stop_node, args=(i, graceful))
            for i in (indices if indices is not None else range(len(self.node_names)))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def start_nodes(self, indices: list[int] | None = None, timeout: float = 300) -> None:
        chosen = indices if indices is not None else list(range(len(self.node_names)))
        for i in chosen:
            self.twin.start_pod(i)
        for i in chosen:
            self._pod(i).wait_ready(timeout)
        self.wait_clustered(timeout)

    def running_nodes(self, i: int = 0) -> list[str]:
        return self.twin.running_nodes(i)

    def wait_clustered(self, timeout: float = 120) -> None:
        """Until every pod lists every pod as running (TimeoutError after ``timeout``)."""
        try:
            self.twin.wait_clustered(timeout)
        except twin.TwinError as error:
            raise TimeoutError(str(error)) from error

    def connected_nodes(self, pid: int) -> list[int]:
        """The RabbitMQ pods process ``pid`` (in a pod) has AMQP connections to."""
        return self.twin.connected_ordinals(pid, AMQP_PORT)

    def pids(self) -> list[int]:
        return sorted(p for pod in self.twin.pods.values() for p in pod.pids())

    def mounted_files(self) -> dict[str, str]:
        """sha256 (first 16 hex) of each rendered file mounted into pod 0's container."""
        spec = self._pod(0).spec
        hashes = {}
        for mount in spec.container.mounts:
            if mount.source.is_file():
                hashes[mount.target] = hashlib.sha256(mount.source.read_bytes()).hexdigest()[:16]
        return hashes

    def close(self) -> None:
        self.twin.close()


class _Exit:
    """A pod's exit, as ``subprocess.Popen`` reports a process's."""

    def __init__(self, pod: pods.Pod) -> None:
        self.pod = pod

    @property
    def pid(self) -> int:
        return self.pod.pid or 0

    @property
    def returncode(self) -> int | None:
        return self.pod.exit_code

    def poll(self) -> int | None:
        return None if self.pod.running() else self.pod.exit_code


class PodWorker:
    """One pod of the worker Deployment."""

    def __init__(self, pod: pods.Pod) -> None:
        self.pod = pod
        self.name = pod.name
        self.proc = _Exit(pod)
        self._stopper: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.pod.pid or 0

    @property
    def nodename_prefix(self) -> str:
        return f"celery@{self.name}"  # the Deployment's --hostname=celery@%h

    def alive(self) -> bool:
        return self.pod.running()

    def log(self, lines: int = 60) -> str:
        return self.pod.tail(lines=lines)

    def wait_ready(self, timeout: float = 60) -> None:
        self.pod.wait_ready(timeout)

    def kill(self) -> None:
        self.pod.kill()

    def terminate(self) -> None:
        """Delete the pod: SIGTERM (Celery's warm shutdown), SIGKILL after the grace."""
        self._stopper = threading.Thread(target=self.pod.stop, daemon=True)
        self._stopper.start()

    def wait(self, timeout: float) -> int:
        if self._stopper is not None:
            self._stopper.join(timeout)
            if self._stopper.is_alive():
                raise subprocess.TimeoutExpired("pod stop", timeout)
        return self.pod.exit_code if self.pod.exit_code is not None else -9


class SchedulerPod:
    def __init__(self, pod: pods.Pod, ids_file: Path) -> None:
        self.pod = pod
        self.proc = _Exit(pod)
        self.ids_file = ids_file

    def output(self) -> str:
        return self.pod.tail(lines=200)

    def published_ids(self) -> list[str]:
        try:
            return [line for line in self.ids_file.read_text().splitlines() if line]
        except FileNotFoundError:
            return []


class PodWorkers:
    """The worker Deployment's pods and the scheduler Job's pod, sharing one ledger."""

    def __init__(self, cluster: twin.StatefulSetTwin, step_seconds: float) -> None:
        self.twin = cluster
        self.marker = cluster.run_id
        self.shared = cluster.shared_dir("run")
        self.ledger = self.shared / "ledger.jsonl"
        self.env = {"TASK_LEDGER": str(self.ledger), "COUNT_STEP_SECONDS": repr(step_seconds)}
        self.procs: list[PodWorker] = []
        #: The worker pods a metrics scrape targets, each from Ready on (at the twin's 2 s
        #: ``workerDownSeconds`` a booting pod would alert; GKE's 5 min covers a boot)
        #: until it is deleted, or, killed, until its replacement is Ready.
        self.scraped: list[str] = []
        #: Told the new list when it changes (the run's Prometheus: its target file).
        self.on_scraped: Callable[[list[str]], None] | None = None

    def start(self, name: str) -> PodWorker:
        worker = PodWorker(self.twin.start_worker(name, self.env))
        self.procs.append(worker)
        return worker

    def replace(self, old: PodWorker, name: str, timeout: float = 60) -> PodWorker:
        """A replacement pod for ``old``, in its place (worker 0 stays worker 0), Ready.
        Only then does it take ``old``'s place among the scraped pods: Kubernetes restarts
        a killed container in its pod, whose target answers again once the new process
        serves its metrics; here the replacement has a name (and address) of its own."""
        worker = PodWorker(self.twin.start_worker(name, self.env))
        self.procs[self.procs.index(old)] = worker
        worker.wait_ready(timeout)
        self._scrape([*(n for n in self.scraped if n != old.name), name])
        return worker

    def deleted(self, old: PodWorker) -> None:
        """``old`` exited as a deleted pod does: no longer a target (its pod is gone)."""
        self._scrape([n for n in self.scraped if n != old.name])

    def start_replicas(self, timeout: float = 120) -> list[PodWorker]:
        """The Deployment's replicas, Ready."""
        started = [self.start(name) for name in self.twin.worker_names()]
        for worker in started:
            worker.wait_ready(timeout)
        self._scrape([*self.scraped, *(w.name for w in started)])
        return started

    def _scrape(self, names: list[str]) -> None:
        self.scraped = names
        if self.on_scraped is not None:
            self.on_scraped(list(names))

    def scheduler(
        self, ids_file: Path, rate: float = 0.0, tasks: int | None = None
    ) -> SchedulerPod:
        """A pod of the scheduler Job, writing the ids RabbitMQ confirmed to ``ids_file``
        (on the shared directory); ``tasks`` overrides the Job's own count."""
        extra = ["--ids-file", str(ids_file), "--rate", repr(rate), "--no-progress"]
        if tasks is not None:
            extra += ["--tasks", str(tasks)]  # the last --tasks wins
        return SchedulerPod(self.twin.run_scheduler(self.env, extra), ids_file)

    def command_pod(self, name: str, command: list[str]) -> pods.Pod:
        """A pod of the worker Deployment's template running ``command`` (a tool of the
        run's, with the workers' broker Secret and network), on the run's shared directory."""
        return self.twin.start_command_pod(name, command, self.env)

    def leftover_pids(self) -> set[int]:
        return {p for pod in self.twin.extra_pods.values() for p in pod.pids()}

    def close(self) -> None:
        for name in list(self.twin.extra_pods):
            self.twin.extra_pods.pop(name).remove()
