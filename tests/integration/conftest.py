"""Fixtures for tests against a real RabbitMQ cluster on 127.0.0.1.

``rabbit_cluster`` is one started 3-node :class:`LocalRabbitCluster` for the whole
session, closed (every process killed by PID / process group) pass or fail.
``make_rabbit_cluster`` builds extra clusters for a single test.
``workers_factory`` makes groups of real Celery worker (and scheduler) processes,
all killed by process group at the end of the test.  Every cluster
created here is registered, and a session-wide autouse check fails the run if any
process a cluster started (``beam.smp``, ``epmd``, the ``sh`` wrapper, Erlang
helpers) is still alive at the end; survivors are killed by PID before failing.

No skipping: when RabbitMQ is not installed the fixtures fail with the install
command (``apt-get install -y rabbitmq-server``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from localcluster.rabbit import LocalRabbitCluster, marked_pids
from localcluster.workers import Workers

log = logging.getLogger(__name__)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


class RabbitRegistry:
    """Every cluster the tests created, and every PID those clusters ever had."""

    def __init__(self) -> None:
        self.clusters: list[LocalRabbitCluster] = []
        self.seen_pids: dict[int, str] = {}  # pid -> cluster id

    def register(self, cluster: LocalRabbitCluster) -> LocalRabbitCluster:
        self.clusters.append(cluster)
        return cluster

    def snapshot(self, cluster: LocalRabbitCluster) -> None:
        for pid in cluster.pids():
            self.seen_pids[pid] = cluster.cluster_id

    def survivors(self) -> dict[int, str]:
        """Live processes of our clusters: recorded PIDs + anything carrying a marker."""
        found: dict[int, str] = {}
        for pid, cluster_id in self.seen_pids.items():
            # Same PID *and* our marker: not a recycled PID of somebody else.
            if _alive(pid) and pid in marked_pids(cluster_id):
                found[pid] = cluster_id
        for cluster in self.clusters:
            for pid in marked_pids(cluster.cluster_id):
                if _alive(pid):
                    found[pid] = cluster.cluster_id
        return found


@pytest.fixture(scope="session")
def rabbit_registry() -> Iterator[RabbitRegistry]:
    registry = RabbitRegistry()
    yield registry
    # Teardown runs after every cluster fixture (they depend on this one).
    for cluster in registry.clusters:
        with contextlib.suppress(Exception):
            cluster.close()
    survivors = registry.survivors()
    if survivors:
        described = ", ".join(f"{pid} ({_comm(pid)})" for pid in sorted(survivors))
        for pid in survivors:  # ours, by PID: do not leave them running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        pytest.fail(f"RabbitMQ test processes survived the session: {described}", pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _no_surviving_rabbit_processes(rabbit_registry: RabbitRegistry) -> Iterator[None]:
    """Autouse, session-wide: the registry's teardown check always runs."""
    yield


@pytest.fixture
def make_rabbit_cluster(
    rabbit_registry: RabbitRegistry,
) -> Iterator[Callable[..., LocalRabbitCluster]]:
    """Factory for a test's own cluster; every one is closed at the end of the test."""
    made: list[LocalRabbitCluster] = []

    def make(**kwargs: Any) -> LocalRabbitCluster:
        cluster = rabbit_registry.register(LocalRabbitCluster(**kwargs))
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        rabbit_registry.snapshot(cluster)
        cluster.close()
        assert cluster.pids() == [], f"cluster {cluster.cluster_id} left {cluster.pids()}"


@pytest.fixture(scope="session")
def rabbit_cluster(rabbit_registry: RabbitRegistry) -> Iterator[LocalRabbitCluster]:
    """A started 3-node cluster shared by the whole session, closed pass or fail."""
    cluster = rabbit_registry.register(LocalRabbitCluster(size=3))
    try:
        cluster.start()
        rabbit_registry.snapshot(cluster)
        log.info("rabbit_cluster ready in %.1f s: %s", cluster.timings["clustered"], cluster)
        yield cluster
    finally:
        rabbit_registry.snapshot(cluster)
        cluster.close()


@pytest.fixture
def workers_factory(tmp_path: Path) -> Iterator[Callable[..., Workers]]:
    """Make Workers groups; every process is killed at teardown, pass or fail."""
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
