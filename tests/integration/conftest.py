"""Fixtures for tests against RabbitMQ as it ships: pods of the prod stack's StatefulSet.

Every RabbitMQ here is the pod twin (:class:`localcluster.twin.StatefulSetTwin`): the
prod stack's own rendered StatefulSet as three RabbitMQ 4.3 pods, each with its own
network namespace, hostname, cgroups and the rendered ConfigMap/Secret files, clustered
by the Kubernetes peer-discovery plugin (docs/twin.md).

``rabbit_twin`` is one started twin (every pod Ready, one cluster) for the whole
session, shared by every test that does not disturb the others; ``make_twin`` makes a
test its own (not started: the test starts it); a module that needs its own cluster
for all its tests builds it on ``twin_registry`` (test_publish_outage.py stops every
node). Every twin made here is registered; at the end of the session each is closed,
pass or fail, and its ``leftovers()`` (processes, network namespaces, cgroups,
mounts, files) must be empty, or the run fails naming what was left.

``worker_pods`` starts pods of the rendered worker Deployment on a twin (the deployed
worker: its command, env and broker Secret), removed at the end of the test;
``workers_factory`` starts Celery worker and scheduler processes on this host that
reach the pods by address (a different pool, finer process control, a publisher),
all killed by process group at the end of the test.

No skipping: a missing root filesystem fails with the command that builds it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection

from localcluster import pods
from localcluster.twin import StatefulSetTwin
from localcluster.workers import Workers

log = logging.getLogger(__name__)

STACK = "prod"
# The queue the rendered worker Deployment consumes (it sets no CELERY_QUEUE).
DEPLOYMENT_QUEUE = "celery"


class TwinRegistry:
    """Every twin the tests made; closes them and says what any of them left."""

    def __init__(self) -> None:
        self.twins: list[StatefulSetTwin] = []
        self._closed: set[str] = set()

    def make(self, stack: str = STACK, **kwargs: Any) -> StatefulSetTwin:
        cluster = StatefulSetTwin(stack, **kwargs)
        self.twins.append(cluster)
        return cluster

    def start(self, cluster: StatefulSetTwin, timeout: float = 300) -> dict[str, float]:
        """Every pod Ready and the three of them one cluster; seconds, for the log."""
        begin = time.monotonic()
        ready = cluster.start(timeout)
        cluster.wait_clustered(timeout)
        log.info(
            "twin %s: pods Ready %s, clustered after %.1f s",
            cluster.run_id,
            {k: round(v, 1) for k, v in ready.items()},
            time.monotonic() - begin,
        )
        return ready

    def close(self, cluster: StatefulSetTwin) -> None:
        if cluster.run_id not in self._closed:
            self._closed.add(cluster.run_id)
            cluster.close()

    def leftovers(self) -> dict[str, dict[str, list[str]]]:
        """run id -> what is left of it, for every twin with something left."""
        found = {}
        for cluster in self.twins:
            left = {kind: items for kind, items in cluster.leftovers().items() if items}
            if left:
                found[cluster.run_id] = left
        return found


@pytest.fixture(scope="session")
def twin_registry() -> Iterator[TwinRegistry]:
    registry = TwinRegistry()
    yield registry
    # Teardown runs after every twin fixture (they depend on this one).
    errors = []
    for cluster in registry.twins:
        try:
            registry.close(cluster)
        except Exception as error:  # close the rest, report below
            errors.append(f"{cluster.run_id}: {error}")
    left = registry.leftovers()
    if left or errors:
        pytest.fail(
            f"pod twins left behind after close: {left}; close errors: {errors}", pytrace=False
        )


@pytest.fixture(scope="session", autouse=True)
def _no_twin_leftovers(twin_registry: TwinRegistry) -> Iterator[None]:
    """Autouse, session-wide: the registry's end-of-session check always runs."""
    yield


@pytest.fixture(scope="session")
def rabbit_twin(twin_registry: TwinRegistry) -> Iterator[StatefulSetTwin]:
    """The prod stack's three RabbitMQ pods, Ready and clustered, for the whole session."""
    cluster = twin_registry.make(STACK)
    try:
        twin_registry.start(cluster)
        yield cluster
    finally:
        twin_registry.close(cluster)


@pytest.fixture
def make_twin(twin_registry: TwinRegistry) -> Iterator[Callable[..., StatefulSetTwin]]:
    """A test's own twin (``make_twin(**StatefulSetTwin kwargs)``), closed after the test."""
    made: list[StatefulSetTwin] = []

    def make(**kwargs: Any) -> StatefulSetTwin:
        cluster = twin_registry.make(kwargs.pop("stack", STACK), **kwargs)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        twin_registry.close(cluster)
        left = {kind: items for kind, items in cluster.leftovers().items() if items}
        assert not left, f"twin {cluster.run_id} left {left}"


def delete_queue(cluster: StatefulSetTwin, queue: str) -> None:
    """Delete ``queue`` (and its messages) of the stack's vhost, over AMQP from this host."""
    with Connection(cluster.broker_urls(by_address=True)[0], connect_timeout=10) as conn:
        conn.default_channel.queue_delete(queue)


@dataclass
class WorkerPods:
    """Pods of the rendered worker Deployment on one twin, sharing a ledger."""

    cluster: StatefulSetTwin
    ledger: Path
    env: dict[str, str]
    started: list[pods.Pod] = field(default_factory=list)

    def start(self, index: int) -> pods.Pod:
        """Pod ``celery-worker-<index>`` (its rotation comes from that name, as deployed)."""
        pod = self.cluster.start_worker(self.cluster.worker_names()[index], self.env)
        self.started.append(pod)
        return pod

    @staticmethod
    def nodename(pod: pods.Pod) -> str:
        """``task.request.hostname`` of its tasks in the ledger (--hostname=celery@%h)."""
        return f"celery@{pod.name}"

    @staticmethod
    def wait_consuming(pod: pods.Pod, timeout: float = 120) -> None:
        """Until Celery logs ``celery@<pod> ready.`` (sooner than the readiness probe)."""
        deadline = time.monotonic() + timeout
        needle = f"celery@{pod.name} ready."
        while needle not in pod.tail(lines=200):
            if not pod.running() and pod.exit_code is not None:
                raise AssertionError(f"{pod.name} exited {pod.exit_code}:\n{pod.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{pod.name} not consuming after {timeout:.0f} s:\n{pod.tail()}"
                )
            time.sleep(0.1)

    def remove(self) -> None:
        for pod in self.started:
            self.cluster.extra_pods.pop(pod.name, None)
            pod.remove()


@pytest.fixture
def worker_pods() -> Iterator[Callable[..., WorkerPods]]:
    """``worker_pods(twin, step_seconds)``: a group of worker Deployment pods with a ledger.

    At the end of the test the pods are removed (SIGKILL) and the Deployment's queue is
    deleted from the twin, so no task of this test reaches the next one's workers.
    """
    made: list[WorkerPods] = []

    def make(cluster: StatefulSetTwin, step_seconds: float) -> WorkerPods:
        ledger = cluster.shared_dir(f"ledger-{uuid.uuid4().hex[:8]}") / "ledger.jsonl"
        env = {"TASK_LEDGER": str(ledger), "COUNT_STEP_SECONDS": repr(step_seconds)}
        group = WorkerPods(cluster, ledger, env)
        made.append(group)
        return group

    yield make
    for group in made:
        group.remove()
        left = [p for pod in group.started for p in pod.pids()]
        assert not left, f"worker pod processes survived: {left}"
        cluster = group.cluster
        # A test that failed with a RabbitMQ pod down: the twin's owner restores it.
        if all(cluster.is_running(i) for i in range(len(cluster.pod_names))):
            delete_queue(cluster, DEPLOYMENT_QUEUE)


@pytest.fixture
def workers_factory(tmp_path: Path) -> Iterator[Callable[..., Workers]]:
    """Make Workers groups (processes on this host); every process is killed at teardown."""
    made: list[Workers] = []

    def make(queue: str, **kw: Any) -> Workers:
        w = Workers(
            kw.pop("broker_urls"),
            queue,
            ledger=tmp_path / "ledger.jsonl",
            workdir=tmp_path / "logs",
            **kw,
        )
        made.append(w)
        return w

    yield make
    errors = []
    for w in made:
        try:
            w.close()
        except RuntimeError as exc:  # pragma: no cover - reported below
            errors.append(str(exc))
    assert not errors, errors
    for w in made:
        assert not w.leftover_pids(), "a worker process survived the test"
