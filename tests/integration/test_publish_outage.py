"""Publishing outlasts a whole-cluster outage, within the publish retry budget.

The real scheduler (``python -m app.scheduler --rate``, on this host, reaching the pods
by address) publishes while all three RabbitMQ pods are deleted (each graceful, all at
once: preStop, SIGTERM) and created again on their volumes:

* an outage shorter than the budget (the pods down ``DOWN_S``, plus the time the
  stop and the new pods take): nothing fails, nothing is lost, every task completes;
* an outage longer than the budget (shortened to ``SHORT_BUDGET_S`` through
  ``CELERY_PUBLISH_RETRY_SECONDS``): the scheduler exits 1 within the budget plus
  a few seconds, writes every task id it did not get confirmed, and publishing
  exactly those once the cluster is back completes the run with nothing lost.

The consumers are pods of the rendered worker Deployment (they reconnect after the
outage). The module runs its own twin of the prod stack (a whole-cluster restart of
the session's shared one would put every later test at risk), registered with the
session's ``twin_registry``: closed, and checked for leftovers, pass or fail.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from app import ledger
from components.rabbitmq import SKIP_PRESTOP_LABEL
from localcluster.twin import StatefulSetTwin
from localcluster.workers import Workers
from tests.integration.conftest import DEPLOYMENT_QUEUE, TwinRegistry, WorkerPods
from tests.integration.test_celery_no_loss import all_completed, report, wait_until

DOWN_S = 10.0
SHORT_BUDGET_S = 10.0
# Between the last pod gone and the scheduler's exit, beyond the budget: the
# attempt in progress (connection refused: milliseconds) and the process exit.
EXIT_SLACK_S = 5.0
STEP_S = 0.001


@pytest.fixture(scope="module")
def outage_twin(twin_registry: TwinRegistry) -> Iterator[StatefulSetTwin]:
    """This module's own twin, Ready and clustered; closed pass or fail."""
    cluster = twin_registry.make()
    try:
        twin_registry.start(cluster)
        yield cluster
    finally:
        twin_registry.close(cluster)


@pytest.fixture
def whole_cluster(outage_twin: StatefulSetTwin) -> Iterator[StatefulSetTwin]:
    """The module's twin, every pod running at the start of the test and at its end."""
    _restart_stopped(outage_twin)
    yield outage_twin
    _restart_stopped(outage_twin)


def _restart_stopped(cluster: StatefulSetTwin) -> None:
    stopped = [i for i in range(len(cluster.pod_names)) if not cluster.is_running(i)]
    if stopped:
        cluster.restart_pods(stopped)


def _retry_seconds(output: str) -> list[float]:
    """How long each publish retried before it was confirmed (app.publish's log)."""
    return [float(x) for x in re.findall(r"confirmed via \S+ after ([\d.]+) s of retrying", output)]


def _pods_state(cluster: StatefulSetTwin) -> str:
    """Each RabbitMQ pod's kubelet events and log tail, for a failure's message."""
    parts = []
    for name, pod in cluster.pods.items():
        events = ", ".join(
            f"{time.strftime('%H:%M:%S', time.localtime(t))} {e}" for t, e in pod.events
        )
        parts.append(f"--- {name}: {events}\n{pod.tail(lines=15)}")
    return "\n".join(parts)


def _listeners_open_after(cluster: StatefulSetTwin, since: float) -> float | None:
    """Seconds from ``since`` (wall clock) until the last pod's AMQP listener opened,
    from the pods' RabbitMQ logs; None if a pod's log does not say so yet."""
    opened = []
    for pod in cluster.pods.values():
        times = [
            datetime.fromisoformat(line.split(" [")[0]).timestamp()
            for line in pod.tail(lines=2000).splitlines()
            if "started TCP listener on" in line and ":5672" in line
        ]
        if not times or times[-1] < since:
            return None
        opened.append(times[-1])
    return round(max(opened) - since, 2)


def _publisher(workers_factory: Callable[..., Workers], cluster: StatefulSetTwin) -> Workers:
    return workers_factory(
        DEPLOYMENT_QUEUE, broker_urls=cluster.broker_urls(by_address=True), step_seconds=STEP_S
    )


def test_publish_through_a_whole_cluster_outage(
    whole_cluster: StatefulSetTwin,
    worker_pods: Callable[..., WorkerPods],
    workers_factory: Callable[..., Workers],
    tmp_path: Path,
) -> None:
    """All three pods deleted (graceful, at once), down ``DOWN_S``, created again while
    the scheduler publishes at a fixed rate: 0 failed, 0 lost, every task completes."""
    cluster = whole_cluster
    rate = 20.0
    # Enough tasks that publishing goes on after the cluster is back (the
    # scheduler catches up the tasks it owes to its rate, then keeps the rate).
    n = int(rate * 70)
    group = worker_pods(cluster, STEP_S)
    t0 = time.monotonic()
    consumers = [group.start(0), group.start(1)]
    for pod in consumers:
        group.wait_consuming(pod)
    ids_file = tmp_path / "ids.txt"
    sched = _publisher(workers_factory, cluster).scheduler(n, ids_file, rate=rate)
    wait_until(lambda: len(sched.published_ids()) >= 40, 30, "publishing to start")
    at_stop = len(sched.published_ids())
    t_stop = time.monotonic()
    for i in range(len(cluster.pod_names)):  # as documented: RabbitPods.stop_nodes
        cluster.set_label(i, SKIP_PRESTOP_LABEL, "true")
    cluster.stop_pods()
    stop_s = time.monotonic() - t_stop
    at_stopped = len(sched.published_ids())
    assert not any(cluster.is_running(i) for i in range(len(cluster.pod_names)))
    time.sleep(DOWN_S)
    at_restart = len(sched.published_ids())
    restarted_at = time.time()
    rejoin_s = cluster.restart_pods()
    outage_s = time.monotonic() - t_stop
    listeners_s = _listeners_open_after(cluster, restarted_at)
    code = sched.proc.wait(timeout=120)
    output = sched.output()
    assert code == 0, (
        f"{output}\nrestart: Ready and clustered after {rejoin_s:.1f} s, AMQP listeners "
        f"open after {listeners_s} s\n{_pods_state(cluster)}"
    )
    assert f"published={n} failed=0 not_attempted=0" in output, output
    assert at_stop < n and at_restart < n, "the cluster was not down mid-publish"
    # (<= 1: a confirm that came in just before the last pod went.)
    assert at_restart - at_stopped <= 1, "published while every pod was down?"
    retried = _retry_seconds(output)
    assert retried and max(retried) >= DOWN_S, f"no publish waited out the outage: {retried}"
    ids = ledger.read_ids(ids_file)
    assert len(ids) == n and len(set(ids)) == n
    wait_until(all_completed(group.ledger, ids_file), 90, "every task to complete")
    assert all(pod.running() for pod in consumers), "a worker died in the outage"
    numbers = report(
        "publish_through_cluster_outage",
        ids,
        group.ledger,
        time.monotonic() - t0,
        published_before_stop=at_stop,
        stop_s=round(stop_s, 2),
        down_s=DOWN_S,
        rejoin_s=round(rejoin_s, 2),
        listeners_open_after_restart_s=listeners_s,
        outage_s=round(outage_s, 2),
        longest_publish_retry_s=max(retried),
        scheduler=output.strip().splitlines()[-1],
    )
    assert numbers["lost"] == 0
    assert numbers["completed"] == n


def test_outage_longer_than_the_budget_names_what_was_not_published(
    whole_cluster: StatefulSetTwin,
    worker_pods: Callable[..., WorkerPods],
    workers_factory: Callable[..., Workers],
    tmp_path: Path,
) -> None:
    """Every pod down for longer than the budget: the scheduler exits 1 within
    budget + a few seconds and lists the ids it did not get confirmed; publishing
    exactly those after the restart completes the run, nothing lost."""
    cluster = whole_cluster
    n, rate = 400, 20.0
    w = _publisher(workers_factory, cluster)
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
    for i in range(len(cluster.pod_names)):  # as documented: RabbitPods.stop_nodes
        cluster.set_label(i, SKIP_PRESTOP_LABEL, "true")
    cluster.stop_pods()
    t_stopped = time.monotonic()
    code = sched.proc.wait(timeout=SHORT_BUDGET_S + EXIT_SLACK_S + 30)
    t_exit = time.monotonic()
    output = sched.output()
    assert code == 1, output
    # It retried for the whole budget, and not much longer, after the last pod went.
    assert t_exit - t_stop >= SHORT_BUDGET_S, output
    assert t_exit - t_stopped <= SHORT_BUDGET_S + EXIT_SLACK_S, (t_exit - t_stopped, output)
    assert f"giving up: no RabbitMQ node took a publish for {SHORT_BUDGET_S:.1f} s" in output
    assert "CELERY_PUBLISH_RETRY_SECONDS=10" in output
    for i in range(len(cluster.pod_names)):  # every pod was tried, and named
        assert f"@{cluster.address(i)}:5672/celery failed" in output, output
    secret = cluster.rendered.data("Secret", "rabbitmq-credentials", cluster.namespace)
    assert "Traceback" not in output and secret["password"] not in output
    confirmed, unconfirmed = ledger.read_ids(ids_file), ledger.read_ids(rest)
    assert confirmed and unconfirmed
    assert not set(confirmed) & set(unconfirmed)
    assert len(confirmed) + len(unconfirmed) == n
    assert f"published={len(confirmed)} failed=1 not_attempted={len(unconfirmed) - 1}" in output
    assert f"{len(unconfirmed)} task ids not confirmed, listed in {rest}" in output

    # The cluster back: publish exactly the rest, run everything, nothing lost.
    restarted_at = time.time()
    rejoin_s = cluster.restart_pods()
    listeners_s = _listeners_open_after(cluster, restarted_at)
    again = w.scheduler(0, ids_file, extra_args=["--publish-ids", str(rest)])
    assert again.proc.wait(timeout=60) == 0, again.output()
    assert f"published={len(unconfirmed)} failed=0" in again.output()
    ids = ledger.read_ids(ids_file)
    assert ids == confirmed + unconfirmed
    group = worker_pods(cluster, STEP_S)
    group.start(0)
    wait_until(all_completed(group.ledger, ids_file), 60, "every task to complete")
    numbers: dict[str, Any] = report(
        "outage_longer_than_budget",
        ids,
        group.ledger,
        time.monotonic() - t0,
        budget_s=SHORT_BUDGET_S,
        stop_s=round(t_stopped - t_stop, 2),
        exit_after_stop_s=round(t_exit - t_stop, 2),
        exit_after_last_pod_s=round(t_exit - t_stopped, 2),
        unconfirmed=len(unconfirmed),
        rejoin_s=round(rejoin_s, 2),
        listeners_open_after_restart_s=listeners_s,
    )
    assert numbers["lost"] == 0
    assert numbers["completed"] == n
