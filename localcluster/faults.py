"""The faults ``python -m localcluster`` injects, one small object each, in one table.

A fault acts on the run's pods through a :class:`FaultContext` (the run: its
RabbitMQ pods, its worker pods, the live ledger) and returns a :class:`FaultRecord`:
what it hit, how it found it, when it struck, when the broken part came back, and
its own evidence. The report (:func:`localcluster.report.build_report`) turns the
record into numbers; nothing here computes them.

Every fault waits ``down_seconds`` before bringing the broken part back, as a
Kubernetes controller would (a new pod on the same volume, a replacement worker,
the partition healed), and returns once it is back.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from localcluster import partition, rabbitlog

if TYPE_CHECKING:
    from localcluster.report import LedgerTail
    from localcluster.twin_engine import PodWorker, PodWorkers, RabbitPods

#: A warm shutdown waits for the running tasks (10 x --task-seconds each).
WARM_SHUTDOWN_TIMEOUT = 120.0
#: How long a partitioned node's peers may take to see it gone, and to see it back.
PARTITION_TIMEOUT = 120.0
#: How long a new pod 0 may take to be Ready, and then to be one cluster with its peers.
POD0_TIMEOUT = 180.0
#: The flood's whole course: fill to the alarm, hold, drain.
FLOOD_TIMEOUT = 420.0


class FaultContext(Protocol):
    """What a fault may use of the run."""

    nodes: RabbitPods
    workers: PodWorkers
    tail: LedgerTail
    down_seconds: float
    #: Which RabbitMQ pod a broker fault hits: the one worker w0 (``worker``) or the
    #: scheduler (``scheduler``) is connected to, or the queue's leader (``leader``).
    target: str
    queue: str
    vhost: str

    def clients(self) -> dict[str, int]:
        """Every AMQP client pod of the run (workers, the scheduler): name -> pid."""
        ...

    def say(self, message: str) -> None: ...
    def set_phase(self, phase: str) -> None: ...
    def sleep(self, seconds: float) -> None: ...
    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float) -> None: ...
    def published(self) -> int: ...
    def completed(self) -> int:
        """Tasks of this batch some worker finished."""
        ...

    def all_done(self) -> bool: ...
    def recording(self, record: FaultRecord) -> FaultRecord:
        """Keep ``record`` as it fills: an interrupted fault still reports what it did."""
        ...


@dataclass
class FaultRecord:
    """What one fault did. Times are wall-clock (``time.time()``)."""

    kind: str
    target: str | None = None
    found_by: str | None = None
    at_completed: int | None = None
    injected: float | None = None
    restarted: float | None = None
    back: float | None = None
    #: Tasks the target was running when it was hit (None: the fault hits no task).
    in_flight_ids: list[str] | None = None
    #: The fault's own evidence (how long the stop took, the pause, the exit status).
    detail: dict[str, Any] = field(default_factory=dict)

    def marks(self) -> dict[str, float]:
        """``fault``/``restart``/``rejoin`` times, as the report and the timeline name them."""
        named = {"fault": self.injected, "restart": self.restarted, "rejoin": self.back}
        return {k: v for k, v in named.items() if v is not None}

    @property
    def rejoin_s(self) -> float | None:
        if self.back is None or self.restarted is None:
            return None
        return round(self.back - self.restarted, 2)


def _target_node(run: FaultContext) -> tuple[int, str]:
    """The RabbitMQ pod ``run.target`` names, and how we know."""
    if run.target == "leader":
        peers = [i for i in range(len(run.nodes.node_names))]
        leader = run.nodes.queue_leader(run.queue, run.vhost, ask=peers[0])
        if leader is not None:
            return leader, f"the leader of quorum queue {run.queue}"
        return 0, f"quorum queue {run.queue} had no leader: pod 0"
    if run.target == "scheduler":
        pid = run.clients().get("scheduler")
        nodes = run.nodes.connected_nodes(pid) if pid else []
        if nodes:
            return nodes[0], "the scheduler's AMQP connection"
        return 0, "the scheduler's connection was not found: pod 0"
    return _w0_node(run)


def _w0_node(run: FaultContext) -> tuple[int, str]:
    """The RabbitMQ pod worker w0 is connected to, and how we know."""
    nodes = run.nodes.connected_nodes(run.workers.procs[0].pid)
    if nodes:
        return nodes[0], "its AMQP connection"
    return 0, "its broker rotation (no connection found)"


def _broker_record(run: FaultContext, kind: str, **detail: Any) -> tuple[int, str, FaultRecord]:
    """The RabbitMQ pod ``run.target`` names, how it was found, and the record of a
    fault about to hit it."""
    node, how = _target_node(run)
    run.tail.poll()
    record = run.recording(
        FaultRecord(
            kind,
            target=run.nodes.node_names[node],
            found_by=how,
            at_completed=run.completed(),
            detail={"node": node, **detail},
        )
    )
    return node, how, record


def _peer_events(nodes: RabbitPods, node: int) -> list[rabbitlog.Event]:
    """What every other pod's RabbitMQ log says (node-down, new leaders, alarms)."""
    peers = [i for i in range(len(nodes.node_names)) if i != node]
    return [e for i in peers for e in rabbitlog.parse(nodes.log(i), nodes.erlang_node(i))]


class NoFault:
    name = "none"
    help = "no fault: the baseline"

    def inject(self, run: FaultContext) -> FaultRecord:
        return FaultRecord(self.name)


@dataclass(frozen=True)
class BrokerPodFault:
    """SIGKILL (a crash) or a graceful stop (preStop, SIGTERM, grace: a drained node) of
    the RabbitMQ pod worker w0 is connected to; then a new pod on the same volume."""

    graceful: bool

    @property
    def name(self) -> str:
        return "broker-stop" if self.graceful else "broker-kill"

    @property
    def help(self) -> str:
        if self.graceful:
            return "stop the RabbitMQ pod w0 is connected to gracefully (preStop, SIGTERM)"
        return "SIGKILL every process of the RabbitMQ pod worker w0 is connected to"

    def inject(self, run: FaultContext) -> FaultRecord:
        node, how = _w0_node(run)
        victim = run.workers.procs[0]
        name = run.nodes.node_names[node]
        run.tail.poll()
        # Tasks w0 is running: their acks can no longer reach the broker, so they are
        # redelivered (and w0's copies finish anyway: duplicates).
        record = run.recording(
            FaultRecord(
                self.name,
                target=name,
                found_by=how,
                at_completed=run.completed(),
                in_flight_ids=sorted(run.tail.in_flight(victim.nodename_prefix)),
                detail={"node": node},
            )
        )
        run.set_phase(f"{name} DOWN")
        record.injected = time.time()
        verb = "stopped (preStop, SIGTERM)" if self.graceful else "SIGKILLed"
        run.say(
            f"FAULT: {verb} RabbitMQ pod {name} (worker {victim.name} is connected to it, "
            f"by {how}) with {record.at_completed} tasks completed"
        )
        run.nodes.stop_node(node, graceful=self.graceful)
        record.detail["stop_s"] = round(time.time() - record.injected, 2)
        run.sleep(run.down_seconds)
        run.set_phase(f"{name} restarting")
        record.restarted = time.time()
        run.say(f"a new pod {name} on the same volume")
        run.nodes.start_node(node)  # returns once every node sees it running
        record.back = time.time()
        run.say(f"{name} rejoined the cluster {record.rejoin_s:.1f} s after its restart")
        return record


class ClusterRestart:
    name = "cluster-restart"
    help = "stop all three RabbitMQ pods gracefully with tasks queued, then start them again"

    def inject(self, run: FaultContext) -> FaultRecord:
        run.tail.poll()
        queued = run.published() - run.completed()
        record = run.recording(
            FaultRecord(
                self.name,
                target="all nodes",
                at_completed=run.completed(),
                # Every worker runs tasks whose acks cannot reach the broker any more.
                in_flight_ids=sorted(run.tail.in_flight("")),
                detail={"queued_or_running": queued},
            )
        )
        run.set_phase("cluster DOWN")
        record.injected = time.time()
        count = len(run.nodes.node_names)
        run.say(
            f"FAULT: stopping all {count} RabbitMQ pods (graceful) with "
            f"{record.at_completed} tasks completed and {queued} not yet"
        )
        run.nodes.stop_nodes(graceful=True)
        record.detail["stop_s"] = round(time.time() - record.injected, 2)
        # The graceful stop (preStop: drain) lets the workers go on for a while: what
        # is still to do once every broker is down is what the restart must keep.
        run.tail.poll()
        record.detail["unfinished_when_stopped"] = run.published() - run.completed()
        run.sleep(run.down_seconds)
        run.set_phase("cluster restarting")
        record.restarted = time.time()
        run.say(f"starting all {count} pods again (same volumes)")
        run.nodes.start_nodes()
        record.back = time.time()
        run.say(f"cluster whole again {record.rejoin_s:.1f} s after the restart")
        return record


class Partition:
    name = "partition"
    help = (
        "cut the RabbitMQ pod w0 is connected to off from its peers on the pod network "
        "(its cluster links reset, clients still reach it), then heal"
    )

    def inject(self, run: FaultContext) -> FaultRecord:
        node, how = _w0_node(run)
        nodes = run.nodes
        victim = run.workers.procs[0]
        name = nodes.node_names[node]
        peers = [i for i in range(len(nodes.node_names)) if i != node]
        run.tail.poll()
        record = run.recording(
            FaultRecord(
                self.name,
                target=name,
                found_by=how,
                at_completed=run.completed(),
                in_flight_ids=sorted(run.tail.in_flight(victim.nodename_prefix)),
                detail={"node": node},
            )
        )
        cut = partition.partition(nodes.network_namespace(node), [nodes.address(i) for i in peers])
        run.set_phase(f"{name} CUT OFF")
        record.injected = time.time()
        run.say(
            f"FAULT: cutting {name} (worker {victim.name} is connected to it, by {how}) off "
            f"from its peers with {record.at_completed} tasks completed"
        )
        try:
            cut.cut()
            # Evidence, from both sides: the peers see it gone, it sees them gone.
            run.wait_for(
                f"{peers} to see {name} gone",
                lambda: all(len(nodes.running_nodes(i)) == len(peers) for i in peers),
                PARTITION_TIMEOUT,
            )
            record.detail["peers_saw_it_gone_s"] = round(time.time() - record.injected, 2)
            record.detail["majority_running_nodes"] = nodes.running_nodes(peers[0])
            record.detail["minority_running_nodes"] = _running_nodes_or_error(nodes, node)
            run.set_phase(f"{name} PARTITIONED")
            run.say(
                f"{name} cut off: its peers see {record.detail['majority_running_nodes']} after "
                f"{record.detail['peers_saw_it_gone_s']} s; it sees "
                f"{record.detail['minority_running_nodes']}"
            )
            run.sleep(run.down_seconds)
            run.set_phase("healing")
            record.restarted = time.time()
            run.say("healing the partition")
        finally:
            cut.heal()  # the rules never outlive the fault
        nodes.wait_clustered(timeout=PARTITION_TIMEOUT)
        record.back = time.time()
        record.detail["w0_connected_to"] = [
            nodes.node_names[i] for i in nodes.connected_nodes(victim.pid)
        ]
        run.say(f"{name} back in the cluster {record.rejoin_s:.1f} s after the heal")
        return record


def _running_nodes_or_error(nodes: RabbitPods, node: int) -> list[str] | str:
    try:
        return nodes.running_nodes(node)
    except Exception as exc:  # its own view is evidence, not a requirement
        return f"unavailable: {str(exc)[-200:]}"


def _busy_first_worker(run: FaultContext, fault: str) -> tuple[PodWorker, FaultRecord]:
    """Worker pod w0 once it runs tasks, and the record of a fault about to hit it."""
    victim = run.workers.procs[0]
    prefix = victim.nodename_prefix
    run.wait_for(
        f"worker {victim.name} to run tasks",
        lambda: bool(run.tail.in_flight(prefix)) or run.all_done(),
        60,
    )
    run.tail.poll()
    record = run.recording(
        FaultRecord(
            fault,
            target=victim.name,
            found_by="the first worker pod",
            at_completed=run.completed(),
            in_flight_ids=sorted(run.tail.in_flight(prefix)),
        )
    )
    return victim, record


@dataclass(frozen=True)
class WorkerPodFault:
    """SIGKILL of worker pod w0 mid-task (a machine dying), or its deletion (SIGTERM:
    Celery's warm shutdown, SIGKILL after the grace); then a replacement pod."""

    graceful: bool

    @property
    def name(self) -> str:
        return "worker-term" if self.graceful else "worker-kill"

    @property
    def help(self) -> str:
        if self.graceful:
            return "delete worker pod w0 mid-task (SIGTERM: Celery's warm shutdown)"
        return "SIGKILL every process of worker pod w0 mid-task"

    def inject(self, run: FaultContext) -> FaultRecord:
        victim, record = _busy_first_worker(run, self.name)
        record.detail["pid"] = victim.pid
        run.set_phase(f"{victim.name} stopping" if self.graceful else f"{victim.name} DEAD")
        record.injected = time.time()
        verb = "deleted (SIGTERM, warm shutdown)" if self.graceful else "SIGKILLed"
        run.say(
            f"FAULT: {verb} worker pod {victim.name} with {len(record.in_flight_ids or [])} "
            f"tasks in flight, {record.at_completed} completed"
        )
        if self.graceful:
            victim.terminate()  # stop consuming, finish and ack what runs, exit
            try:
                record.detail["exit_status"] = victim.wait(timeout=WARM_SHUTDOWN_TIMEOUT)
            except subprocess.TimeoutExpired:
                run.say(f"{victim.name} still running {WARM_SHUTDOWN_TIMEOUT:.0f} s after SIGTERM")
                victim.kill()
                record.detail["exit_status"] = "killed after timeout"
            record.detail["stop_s"] = round(time.time() - record.injected, 2)
            run.workers.deleted(victim)
            run.set_phase(f"{victim.name} DEAD")
        else:
            victim.kill()  # every process of the pod: no warm shutdown, no ack
            record.detail["exit_status"] = victim.proc.returncode
        run.sleep(run.down_seconds)
        run.set_phase(f"{victim.name} replaced")
        record.restarted = time.time()
        # A new name, as Kubernetes gives a replacement pod (and a fresh log).
        replacement = run.workers.replace(victim, f"{victim.name}r")  # Ready
        record.back = time.time()
        record.detail["replacement"] = replacement.name
        run.say(f"replacement worker pod {replacement.name} Ready after {record.rejoin_s} s")
        return record


class ClientWatch:
    """Which RabbitMQ pods each client pod is connected to, sampled every ``every`` s in a
    thread: when did each client leave a lost node for another one."""

    def __init__(self, run: FaultContext, every: float = 0.25) -> None:
        self.run = run
        self.every = every
        self.samples: dict[str, list[tuple[float, list[int]]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            for name, pid in self.run.clients().items():
                try:
                    nodes = self.run.nodes.connected_nodes(pid)
                except Exception:  # a pod going away mid-sample
                    continue
                self.samples.setdefault(name, []).append((now, nodes))
            self._stop.wait(self.every)

    def __enter__(self) -> ClientWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def moved(self, node: int, since: float) -> dict[str, float | None]:
        """Client -> seconds after ``since`` until it was connected elsewhere and no longer
        to ``node`` (None: it never moved, or was never on ``node``)."""
        moved: dict[str, float | None] = {}
        for name, samples in self.samples.items():
            was_on = any(node in nodes for t, nodes in samples if t <= since + self.every)
            if not was_on:
                continue
            moved[name] = next(
                (
                    round(t - since, 2)
                    for t, nodes in samples
                    if t >= since and nodes and node not in nodes
                ),
                None,
            )
        return moved


@dataclass(frozen=True)
class MachineLoss:
    """A machine that dies silently: every process of a pod frozen at once (cgroup freezer)
    and its network dropped (nothing answered, nothing reset) for ``down_seconds``, then
    the pod replaced as Kubernetes would (killed, started again on the same volume)."""

    worker: bool = False

    @property
    def name(self) -> str:
        return "worker-machine-loss" if self.worker else "machine-loss"

    @property
    def help(self) -> str:
        if self.worker:
            return "worker pod w0's machine dies silently (frozen, packets dropped), then replaced"
        return (
            "the machine of the RabbitMQ pod --target names dies silently (frozen, packets "
            "dropped), then the pod is replaced on its volume"
        )

    def inject(self, run: FaultContext) -> FaultRecord:
        return self._worker(run) if self.worker else self._broker(run)

    def _broker(self, run: FaultContext) -> FaultRecord:
        nodes = run.nodes
        node, how, record = _broker_record(run, self.name)
        name, lost = nodes.node_names[node], nodes.erlang_node(node)
        quiet = partition.silence(nodes.network_namespace(node))
        with ClientWatch(run) as watch:
            time.sleep(2 * watch.every)  # where every client is before the fault
            run.set_phase(f"{name} LOST")
            record.injected = time.time()
            run.say(
                f"FAULT: the machine of {name} (found by {how}) is lost: frozen, its packets "
                f"dropped, with {record.at_completed} tasks completed"
            )
            try:
                nodes.freeze(node)
                quiet.cut()
                run.sleep(run.down_seconds)
            finally:
                quiet.heal()
            run.set_phase(f"{name} replaced")
            record.restarted = time.time()
            run.say(f"{name} replaced: killed, a new pod on the same volume")
            nodes.stop_node(node, graceful=False)
            nodes.start_node(node)
            record.back = time.time()
        events = _peer_events(nodes, node)
        injected = record.injected
        down = rabbitlog.first_down(events, lost, injected)
        leader = rabbitlog.first_new_leader(events, run.queue, injected, other_than=lost)
        record.detail.update(
            declared_down_s={peer: round(t - injected, 2) for peer, t in sorted(down.items())},
            all_peers_declared_down_s=round(max(down.values()) - injected, 2)
            if len(down) == len(nodes.node_names) - 1
            else None,
            new_leader_s=None if leader is None else round(leader.ts - injected, 2),
            new_leader=None if leader is None else leader.node,
            clients_moved_s=watch.moved(node, injected),
        )
        run.say(
            f"{name} back {record.rejoin_s} s after its replacement; peers declared it down "
            f"after {record.detail['declared_down_s']} s, new leader of {run.queue} after "
            f"{record.detail['new_leader_s']} s, clients moved after "
            f"{record.detail['clients_moved_s']}"
        )
        return record

    def _worker(self, run: FaultContext) -> FaultRecord:
        victim, record = _busy_first_worker(run, self.name)
        prefix = victim.nodename_prefix
        in_flight = record.in_flight_ids or []
        quiet = partition.silence(victim.pod.netns)
        run.set_phase(f"{victim.name} LOST")
        record.injected = time.time()
        run.say(
            f"FAULT: the machine of worker pod {victim.name} is lost (frozen, packets dropped) "
            f"with {len(in_flight)} tasks in flight, {record.at_completed} completed"
        )
        try:
            victim.pod.freeze()
            quiet.cut()
            # Its tasks must come back to the others: when did each start again elsewhere?
            run.wait_for(
                f"the tasks {victim.name} held to be redelivered",
                lambda: run.tail.restarted_elsewhere(in_flight, prefix) or run.all_done(),
                max(run.down_seconds, 1.0),
            )
        except TimeoutError:
            pass  # measured below: not redelivered while the machine was gone
        finally:
            run.sleep(max(0.0, record.injected + run.down_seconds - time.time()))
            quiet.heal()
        record.detail["redelivered_s"] = run.tail.redelivered_after(
            in_flight, prefix, record.injected
        )
        run.set_phase(f"{victim.name} replaced")
        record.restarted = time.time()
        victim.kill()
        replacement = run.workers.replace(victim, f"{victim.name}r")  # Ready
        record.back = time.time()
        record.detail["replacement"] = replacement.name
        run.say(
            f"{victim.name}'s {len(in_flight)} tasks redelivered after "
            f"{record.detail['redelivered_s']} s; replacement {replacement.name} Ready"
        )
        return record


@dataclass(frozen=True)
class Pause:
    """A stop-the-world pause: every process of a pod frozen for ``down_seconds``, then
    thawed, its network untouched (the kernel still acknowledges TCP): a long garbage
    collection, CPU starvation, a VM live migration. Nothing failed, so this measures
    the price of the short timeouts that make ``machine-loss`` fast: whether the peers
    took a paused RabbitMQ node for dead (``net_ticktime``) and its clients left it
    (AMQP heartbeats), or RabbitMQ took a paused worker for dead and ran its tasks
    again elsewhere (its heartbeat), and whether anything was lost."""

    worker: bool = False

    @property
    def name(self) -> str:
        return "worker-pause" if self.worker else "broker-pause"

    @property
    def help(self) -> str:
        if self.worker:
            return "worker pod w0 paused (frozen, network untouched), then thawed"
        return "the RabbitMQ pod --target names paused (frozen, network untouched), then thawed"

    def inject(self, run: FaultContext) -> FaultRecord:
        return self._worker(run) if self.worker else self._broker(run)

    def _broker(self, run: FaultContext) -> FaultRecord:
        nodes = run.nodes
        node, how, record = _broker_record(run, self.name, paused_s=run.down_seconds)
        name, paused = nodes.node_names[node], nodes.erlang_node(node)
        with ClientWatch(run) as watch:
            time.sleep(2 * watch.every)  # where every client is before the pause
            run.set_phase(f"{name} PAUSED")
            record.injected = time.time()
            run.say(f"FAULT: {name} (found by {how}) paused for {run.down_seconds:.0f} s")
            try:
                nodes.freeze(node)
                run.sleep(run.down_seconds)
            finally:
                nodes.thaw(node)
            record.restarted = time.time()
            run.set_phase(f"{name} thawed")
            # Taken for dead meanwhile, it must come back on its own (no replacement).
            nodes.wait_clustered(timeout=PARTITION_TIMEOUT)
            record.back = time.time()
        down = rabbitlog.first_down(_peer_events(nodes, node), paused, record.injected)
        moved = watch.moved(node, record.injected)
        record.detail.update(
            declared_down_s={p: round(t - record.injected, 2) for p, t in sorted(down.items())},
            taken_for_dead=bool(down),
            clients_moved_s=moved,
            clients_left=sorted(c for c, s in moved.items() if s is not None),
        )
        run.say(
            f"{name} thawed after {run.down_seconds:.0f} s: peers declared it down "
            f"{record.detail['declared_down_s'] or 'never'}; clients that left it: "
            f"{record.detail['clients_left'] or 'none'}; back in the cluster "
            f"{record.rejoin_s} s after the thaw"
        )
        return record

    def _worker(self, run: FaultContext) -> FaultRecord:
        victim, record = _busy_first_worker(run, self.name)
        prefix = victim.nodename_prefix
        in_flight = record.in_flight_ids or []
        record.detail["paused_s"] = run.down_seconds
        run.set_phase(f"{victim.name} PAUSED")
        record.injected = time.time()
        run.say(
            f"FAULT: worker pod {victim.name} paused for {run.down_seconds:.0f} s with "
            f"{len(in_flight)} tasks in flight"
        )
        try:
            victim.pod.freeze()
            run.sleep(run.down_seconds)
        finally:
            victim.pod.thaw()
        record.restarted = time.time()
        run.set_phase(f"{victim.name} thawed")
        # Whether RabbitMQ took it for dead (closed its connection: 2 missed heartbeats)
        # shows in the ledger: its tasks start again, elsewhere or on it once it is back
        # (the report's ``in_flight_redelivered``, read once the batch is done).
        record.back = time.time()
        redelivered = run.tail.redelivered_after(in_flight, prefix, record.injected)
        record.detail.update(redelivered_elsewhere_s=redelivered, survived=victim.alive())
        run.say(
            f"{victim.name} thawed after {run.down_seconds:.0f} s with {len(in_flight)} tasks "
            + (
                f"that ran again elsewhere {redelivered} s after the pause began"
                if redelivered is not None
                else "not run elsewhere meanwhile"
            )
            + f"; the pod {'survived' if victim.alive() else 'died'}"
        )
        return record


class Pod0VolumeLoss:
    """Pod 0 killed, its volume emptied (a deleted PVC, a replaced disk), a new pod 0
    started: it must rejoin the cluster pods 1..n run, never seed a second one (from
    4.1 the Kubernetes plugin makes ordinal 0 the seed; the StatefulSet's start
    command handles it, components/rabbitmq.py)."""

    name = "pod0-volume-loss"
    help = "pod 0's volume emptied and the pod replaced: it must rejoin, not found a new cluster"

    def inject(self, run: FaultContext) -> FaultRecord:
        nodes = run.nodes
        name = nodes.node_names[0]
        run.tail.poll()
        record = run.recording(
            FaultRecord(
                self.name,
                target=name,
                found_by="ordinal 0 (the seed of Kubernetes peer discovery from 4.1)",
                at_completed=run.completed(),
                detail={"node": 0},
            )
        )
        run.set_phase(f"{name} LOST ITS VOLUME")
        record.injected = time.time()
        run.say(f"FAULT: {name} killed and its volume emptied, {record.at_completed} completed")
        nodes.stop_node(0, graceful=False)
        nodes.empty_volume(0)
        run.sleep(run.down_seconds)
        run.set_phase(f"{name} replaced")
        record.restarted = time.time()
        nodes.twin.start_pod(0).wait_ready(POD0_TIMEOUT)
        try:
            nodes.wait_clustered(timeout=POD0_TIMEOUT)
            record.back = time.time()
            record.detail["one_cluster"] = True
        except TimeoutError:
            record.detail["one_cluster"] = False
        record.detail["running_nodes"] = {
            nodes.node_names[i]: _running_nodes_or_error(nodes, i)
            for i in range(len(nodes.node_names))
        }
        how = "rejoined the cluster" if record.detail["one_cluster"] else "did NOT rejoin"
        run.say(f"{name} {how}: {record.detail['running_nodes']}")
        return record


class MemoryPressure:
    """Large messages published (``python -m localcluster.flood``, a pod of the worker
    Deployment) until RabbitMQ's memory alarm blocks the publishers, under the RabbitMQ
    pods' memory limits as shipped; the alarm held ``down_seconds``; then the flood's
    queue drained. The evidence: when the alarm was raised and cleared (the nodes' logs),
    when the publishers were blocked, each pod's peak memory against its limit and
    alarm threshold, OOM kills and restarts (must be none), and every confirmed message
    consumed (nothing confirmed lost). Celery's tasks run on meanwhile: the workers
    consume through the alarm; the scheduler's publishes wait for it."""

    name = "memory-pressure"
    help = (
        "publish 8 MiB messages until RabbitMQ's memory alarm blocks publishers (the "
        "pods' memory limits as shipped), hold it, then drain: no OOM kill, nothing "
        "confirmed lost"
    )
    queue = "memory-pressure"
    pod = "memory-flood"

    def inject(self, run: FaultContext) -> FaultRecord:
        nodes = run.nodes
        count = len(nodes.node_names)
        before = [nodes.memory(i) for i in range(count)]
        threshold = [nodes.memory_alarm_threshold(i) for i in range(count)]
        limit = [nodes.memory_limit(i) for i in range(count)]
        run.tail.poll()
        record = run.recording(
            FaultRecord(
                self.name,
                target="every RabbitMQ pod",
                found_by="their memory alarm",
                at_completed=run.completed(),
                detail={
                    "memory_limit_mib": [_mib(b) for b in limit],
                    "alarm_threshold_mib": [_mib(b) for b in threshold],
                },
            )
        )
        shared = run.workers.shared
        events, result = shared / "flood-events.jsonl", shared / "flood-result.json"
        for path in (events, result):
            path.unlink(missing_ok=True)
        peaks = [b["rss"] for b in before]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.25):
                for i in range(count):
                    # A pod gone (OOM-killed, say): its peak so far stays.
                    with contextlib.suppress(OSError):
                        peaks[i] = max(peaks[i], nodes.memory(i)["rss"])

        sampler = threading.Thread(target=sample, daemon=True)
        run.set_phase("flooding")
        record.injected = time.time()
        run.say(
            f"FAULT: memory pressure: 8 MiB messages published until the memory alarm "
            f"(thresholds {record.detail['alarm_threshold_mib']} MiB, pod limits "
            f"{record.detail['memory_limit_mib']} MiB), with {record.at_completed} completed"
        )
        flood = run.workers.command_pod(
            f"{self.pod}-{int(record.injected)}",
            [
                "python",
                "-m",
                "localcluster.flood",
                "--queue",
                self.queue,
                "--hold-seconds",
                repr(run.down_seconds),
                "--max-mib",
                repr(4 * _mib(max(limit))),
                "--events",
                str(events),
                "--result",
                str(result),
            ],
        )
        sampler.start()
        seen: set[str] = set()
        try:
            run.wait_for(
                "the flood to fill, block, drain",
                lambda: _follow_flood(run, events, seen, record) or not flood.running(),
                FLOOD_TIMEOUT,
            )
        finally:
            stop.set()
            sampler.join(timeout=5)
        record.back = time.time()
        after = [nodes.memory(i) for i in range(count)]
        try:
            outcome = json.loads(result.read_text())
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"the flood pod wrote no result: {exc}\n{flood.tail()}") from exc
        logged = [
            e for i in range(count) for e in rabbitlog.parse(nodes.log(i), nodes.erlang_node(i))
        ]
        raised, cleared = rabbitlog.memory_alarms(logged, record.injected)
        injected = record.injected
        record.detail.update(
            alarm_s=_since(raised, injected),
            blocked_s=_since(outcome["blocked"], injected),
            cleared_s=_since(cleared, injected),
            unblocked_s=_since(outcome["unblocked"], injected),
            drained_s=_since(outcome["drained"], injected),
            peak_rss_mib=[_mib(b) for b in peaks],
            oom_kills=[a["oom_kills"] - b["oom_kills"] for a, b in zip(after, before, strict=True)],
            restarted=[
                a["pid"] != b["pid"] or a["restarts"] != b["restarts"]
                for a, b in zip(after, before, strict=True)
            ],
            flood={
                k: v
                for k, v in outcome.items()
                if k not in {"started", "stopped", "blocked", "unblocked", "drained"}
            },
        )
        run.say(
            f"memory alarm after {record.detail['alarm_s']} s (publishers blocked after "
            f"{record.detail['blocked_s']} s), cleared after {record.detail['cleared_s']} s; "
            f"peak {record.detail['peak_rss_mib']} MiB; OOM kills {record.detail['oom_kills']}; "
            f"flood: {outcome['confirmed']} confirmed, {outcome['consumed']} consumed, "
            f"{outcome['confirmed_lost']} confirmed and lost"
        )
        return record


def _mib(size: float) -> float:
    return round(size / (1024 * 1024), 1)


def _since(ts: float | None, since: float) -> float | None:
    return None if ts is None else round(ts - since, 2)


def _follow_flood(run: FaultContext, events: Path, seen: set[str], record: FaultRecord) -> bool:
    """Follow the flood's events on the progress line; the drain restarts the work."""
    try:
        lines = events.read_text().splitlines()
    except FileNotFoundError:
        return False
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line being written
        name = event.get("event")
        if name in seen:
            continue
        seen.add(name)
        if name == "blocked":
            run.set_phase("MEMORY ALARM: publishers blocked")
        elif name == "draining":
            run.set_phase("draining the flood")
            record.restarted = event["ts"]
        elif name == "drained":
            run.set_phase("flood drained")
    return False


class Fault(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def help(self) -> str: ...
    def inject(self, run: FaultContext) -> FaultRecord: ...


#: Every fault ``--fault`` accepts, by name, in the order ``--help`` lists them.
FAULTS: dict[str, Fault] = {
    f.name: f
    for f in (
        BrokerPodFault(graceful=False),
        BrokerPodFault(graceful=True),
        WorkerPodFault(graceful=False),
        WorkerPodFault(graceful=True),
        ClusterRestart(),
        Partition(),
        MachineLoss(worker=False),
        MachineLoss(worker=True),
        Pause(worker=False),
        Pause(worker=True),
        Pod0VolumeLoss(),
        MemoryPressure(),
        NoFault(),
    )
}
