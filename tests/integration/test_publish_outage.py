"""Publishing outlasts a whole-cluster outage, within the publish retry budget.

The real scheduler (``python -m app.scheduler --rate``) publishes while all three
RabbitMQ nodes are stopped (SIGTERM, RabbitMQ's graceful shutdown, all at once)
and started again:

* an outage shorter than the budget (30 s down): nothing fails, nothing is lost,
  every task completes;
* an outage longer than the budget (shortened to ``SHORT_BUDGET_S`` through
  ``CELERY_PUBLISH_RETRY_SECONDS``): the scheduler exits 1 within the budget plus
  a few seconds, writes every task id it did not get confirmed, and publishing
  exactly those once the cluster is back completes the run with nothing lost.

The module runs its own 3-node cluster (a whole-cluster restart of the session's
shared one would put every later test at risk); every process it or the tests
start is killed by PID, pass or fail (tests/integration/conftest.py).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app import ledger
from localcluster.rabbit import LocalRabbitCluster
from localcluster.workers import Workers
from tests.integration.conftest import RabbitRegistry
from tests.integration.test_celery_no_loss import all_completed, report, unique_queue, wait_until

pytestmark = pytest.mark.rabbitmq

DOWN_S = 30.0
SHORT_BUDGET_S = 10.0
# Between the last node gone and the scheduler's exit, beyond the budget: the
# attempt in progress (connection refused: milliseconds) and the process exit.
EXIT_SLACK_S = 5.0


@pytest.fixture(scope="module")
def outage_cluster(rabbit_registry: RabbitRegistry) -> Iterator[LocalRabbitCluster]:
    """This module's own started 3-node cluster, closed (every process killed) pass or fail."""
    cluster = rabbit_registry.register(LocalRabbitCluster(size=3))
    try:
        cluster.start()
        rabbit_registry.snapshot(cluster)
        yield cluster
    finally:
        rabbit_registry.snapshot(cluster)
        cluster.close()


@pytest.fixture
def whole_cluster(
    outage_cluster: LocalRabbitCluster, rabbit_registry: RabbitRegistry
) -> Iterator[LocalRabbitCluster]:
    """The module's cluster, whole at the start of the test and again at its end."""
    _restart_stopped(outage_cluster)
    yield outage_cluster
    rabbit_registry.snapshot(outage_cluster)
    _restart_stopped(outage_cluster)


def _restart_stopped(cluster: LocalRabbitCluster) -> None:
    stopped = [i for i in range(cluster.size) if not cluster.is_running(i)]
    if stopped:
        cluster.start_nodes(stopped)


def _retry_seconds(output: str) -> list[float]:
    """How long each publish retried before it was confirmed (app.publish's log)."""
    return [float(x) for x in re.findall(r"confirmed via \S+ after ([\d.]+) s of retrying", output)]


def test_publish_through_a_whole_cluster_outage(
    whole_cluster: LocalRabbitCluster, workers_factory: Callable[..., Workers], tmp_path: Path
) -> None:
    """All three nodes stopped for 30 s and started again while the scheduler
    publishes at a fixed rate: 0 failed, 0 lost, every task completes."""
    cluster = whole_cluster
    rate = 20.0
    # Enough tasks that publishing goes on after the cluster is back (the
    # scheduler catches up the tasks it owes to its rate, then keeps the rate).
    n = int(rate * 70)
    w = workers_factory(
        unique_queue("outage"),
        broker_urls=cluster.broker_urls(),
        concurrency=20,
        step_seconds=0.01,
    )
    t0 = time.monotonic()
    w.start_many(["a", "b"])  # rotations 0 and 1; they reconnect after the outage
    ids_file = tmp_path / "ids.txt"
    sched = w.scheduler(n, ids_file, rate=rate)
    wait_until(lambda: len(sched.published_ids()) >= 40, 30, "publishing to start")
    at_stop = len(sched.published_ids())
    t_stop = time.monotonic()
    cluster.stop_nodes(graceful=True)
    stop_s = time.monotonic() - t_stop
    at_stopped = len(sched.published_ids())
    assert not any(cluster.is_running(i) for i in range(cluster.size))
    time.sleep(DOWN_S)
    at_restart = len(sched.published_ids())
    t_restart = time.monotonic()
    cluster.start_nodes()
    rejoin_s = time.monotonic() - t_restart
    outage_s = time.monotonic() - t_stop
    code = sched.proc.wait(timeout=120)
    output = sched.output()
    assert code == 0, output
    assert f"published={n} failed=0 not_attempted=0" in output, output
    assert at_stop < n and at_restart < n, "the cluster was not down mid-publish"
    # (<= 1: a confirm that came in just before the last node went.)
    assert at_restart - at_stopped <= 1, "published while every node was down?"
    retried = _retry_seconds(output)
    assert retried and max(retried) >= DOWN_S, f"no publish waited out the outage: {retried}"
    ids = ledger.read_ids(ids_file)
    assert len(ids) == n and len(set(ids)) == n
    wait_until(all_completed(w.ledger, ids_file), 90, "every task to complete")
    assert all(p.alive() for p in w.procs), "a worker died in the outage"
    numbers = report(
        "publish_through_cluster_outage",
        ids,
        w.ledger,
        time.monotonic() - t0,
        published_before_stop=at_stop,
        stop_s=round(stop_s, 2),
        down_s=DOWN_S,
        rejoin_s=round(rejoin_s, 2),
        outage_s=round(outage_s, 2),
        longest_publish_retry_s=max(retried),
        scheduler=output.strip().splitlines()[-1],
    )
    assert numbers["lost"] == 0
    assert numbers["completed"] == n


def test_outage_longer_than_the_budget_names_what_was_not_published(
    whole_cluster: LocalRabbitCluster, workers_factory: Callable[..., Workers], tmp_path: Path
) -> None:
    """Every node stopped for longer than the budget: the scheduler exits 1 within
    budget + a few seconds and lists the ids it did not get confirmed; publishing
    exactly those after the restart completes the run, nothing lost."""
    cluster = whole_cluster
    n, rate = 400, 20.0
    w = workers_factory(
        unique_queue("budget"),
        broker_urls=cluster.broker_urls(),
        concurrency=20,
        step_seconds=0.01,
    )
    t0 = time.monotonic()
    ids_file, rest = tmp_path / "ids.txt", tmp_path / "unconfirmed.txt"
    sched = w.scheduler(
        n,
        ids_file,
        rate=rate,
        publish_retry_seconds=SHORT_BUDGET_S,
        extra_args=["--unconfirmed-file", str(rest)],
    )
    wait_until(lambda: len(sched.published_ids()) >= 20, 30, "publishing to start")
    t_stop = time.monotonic()
    cluster.stop_nodes(graceful=True)
    t_stopped = time.monotonic()
    code = sched.proc.wait(timeout=SHORT_BUDGET_S + EXIT_SLACK_S + 30)
    t_exit = time.monotonic()
    output = sched.output()
    assert code == 1, output
    # It retried for the whole budget, and not much longer, after the last node went.
    assert t_exit - t_stop >= SHORT_BUDGET_S, output
    assert t_exit - t_stopped <= SHORT_BUDGET_S + EXIT_SLACK_S, (t_exit - t_stopped, output)
    assert f"giving up: no RabbitMQ node took a publish for {SHORT_BUDGET_S:.1f} s" in output
    assert "CELERY_PUBLISH_RETRY_SECONDS=10" in output
    for port in cluster.amqp_ports:  # every node was tried, and named
        assert f"@127.0.0.1:{port}/celery failed" in output, output
    assert "Traceback" not in output and cluster.password not in output
    confirmed, unconfirmed = ledger.read_ids(ids_file), ledger.read_ids(rest)
    assert confirmed and unconfirmed
    assert not set(confirmed) & set(unconfirmed)
    assert len(confirmed) + len(unconfirmed) == n
    assert f"published={len(confirmed)} failed=1 not_attempted={len(unconfirmed) - 1}" in output
    assert f"{len(unconfirmed)} task ids not confirmed, listed in {rest}" in output

    # The cluster back: publish exactly the rest, run everything, nothing lost.
    t_restart = time.monotonic()
    cluster.start_nodes()
    rejoin_s = time.monotonic() - t_restart
    again = w.scheduler(0, ids_file, extra_args=["--publish-ids", str(rest)])
    assert again.proc.wait(timeout=60) == 0, again.output()
    assert f"published={len(unconfirmed)} failed=0" in again.output()
    ids = ledger.read_ids(ids_file)
    assert ids == confirmed + unconfirmed
    w.start_many(["a"])
    wait_until(all_completed(w.ledger, ids_file), 60, "every task to complete")
    numbers: dict[str, Any] = report(
        "outage_longer_than_budget",
        ids,
        w.ledger,
        time.monotonic() - t0,
        budget_s=SHORT_BUDGET_S,
        stop_s=round(t_stopped - t_stop, 2),
        exit_after_stop_s=round(t_exit - t_stop, 2),
        exit_after_last_node_s=round(t_exit - t_stopped, 2),
        unconfirmed=len(unconfirmed),
        rejoin_s=round(rejoin_s, 2),
    )
    assert numbers["lost"] == 0
    assert numbers["completed"] == n
