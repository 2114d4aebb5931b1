"""The alert rules read metrics RabbitMQ really serves: the session twin's RabbitMQ
4.3.6 pods are scraped as the PodMonitorings say (port, path, params), and every
metric name the rules use (components/monitoring.py) is on those pages, with the
labels the rules match on.
"""

from __future__ import annotations

import base64
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from kombu import Connection

from components import autoscaling, monitoring
from components.config import load_stack_config
from localcluster.twin import StatefulSetTwin
from localcluster.workers import Workers
from tests.integration.conftest import DEPLOYMENT_QUEUE, WorkerPods
from tools.mockrun import run_program, stack_config

STACK = "prod"
PROMQL_NAME = re.compile(r"\b(rabbitmq_[a-z0-9_]+)\b")


def _scrape(address: str, port: int, endpoint: dict[str, Any]) -> str:
    query = urllib.parse.urlencode(endpoint.get("params", {}), doseq=True)
    url = f"http://{address}:{port}{endpoint['path']}" + (f"?{query}" if query else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200, url
        return str(response.read().decode())


def _names(page: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in page.splitlines() if line[:1].isalpha()}


def test_every_metric_the_rules_read_is_served_by_rabbitmq(rabbit_twin: StatefulSetTwin) -> None:
    run = run_program(stack_config(STACK), STACK)
    assert run.error is None, run.error
    monitorings = {
        m["metadata"]["name"]: m["spec"]["endpoints"][0]
        for _, m in run.kubernetes_objects()
        # RabbitMQ's (the workers' one: the test below)
        if m["kind"] == "PodMonitoring" and m["metadata"]["namespace"] == "rabbitmq"
    }
    statefulset = run.kubernetes_object("StatefulSet")
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: int(p["containerPort"]) for p in container["ports"]}
    config = load_stack_config(stack_config(STACK), STACK)
    args = monitoring.MonitoringArgs.from_stack(config, "celery")
    # The work queue exists once a worker declared it; declare it as Celery does
    # (quorum), and make it hold a message and an unacked one so its series are there.
    url = rabbit_twin.broker_urls(by_address=True)[0]
    with Connection(url) as conn:
        channel = conn.channel()
        channel.queue_declare(
            args.queue, durable=True, auto_delete=False, arguments={"x-queue-type": "quorum"}
        )
        channel.basic_publish(channel.prepare_message(b"x"), exchange="", routing_key=args.queue)
        channel.basic_publish(channel.prepare_message(b"y"), exchange="", routing_key=args.queue)
        deadline = time.monotonic() + 10  # the publishes are not confirmed: poll
        while (held := channel.basic_get(args.queue, no_ack=False)) is None:
            assert time.monotonic() < deadline, "the published messages never arrived"
            time.sleep(0.1)
        try:
            served: set[str] = set()
            pages: dict[str, str] = {}
            for i in range(len(rabbit_twin.pod_names)):
                for job, endpoint in monitorings.items():
                    page = _scrape(rabbit_twin.address(i), ports[endpoint["port"]], endpoint)
                    served |= _names(page)
                    pages[f"{job}/{i}"] = page
        finally:
            channel.basic_reject(held.delivery_tag, requeue=True)
            channel.queue_delete(args.queue)
            channel.close()
    wanted = {
        name
        for group in monitoring.rule_groups(args)
        for rule in group["rules"]
        for name in PROMQL_NAME.findall(rule["expr"])
    }
    assert len(wanted) >= 8, wanted
    assert wanted - served == set(), f"not served by RabbitMQ: {sorted(wanted - served)}"
    # The per-queue series carry the vhost and queue labels the rules match on.
    detailed = "".join(p for k, p in pages.items() if k.startswith(monitoring.QUEUES_JOB))
    for queue in (args.queue, args.dead_letter_queue):
        assert f'vhost="{args.vhost}",queue="{queue}"' in detailed, queue


# --- KEDA's query and the worker's own metrics, on one worker pod -------------------

SLOW_TASKS = 40  # more than the pod's 32 threads take: some stay ready
QUICK_TASKS = 5


def _queue_depth(rabbit_twin: StatefulSetTwin) -> tuple[dict[str, Any], str]:
    """The queue as KEDA's scaler reads it: its trigger, its TriggerAuthentication's
    Secret (the rendered one, with this run's generated password), its URL."""
    rendered = rabbit_twin.rendered
    (scaled,) = rendered.of_kind("ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    namespace = scaled["metadata"]["namespace"]
    auth = rendered.get("TriggerAuthentication", trigger["authenticationRef"]["name"])
    params = {
        ref["parameter"]: rendered.data("Secret", ref["name"], namespace)[ref["key"]]
        for ref in auth["spec"]["secretTargetRef"]
    }
    meta = trigger["metadata"]
    url = autoscaling.queue_depth_url(params["host"], meta["vhostName"], meta["queueName"])
    # The client Service's DNS name: no DNS on this host; any pod answers for the Service.
    host = urllib.parse.urlsplit(url).hostname
    assert host is not None and host.startswith("rabbitmq.rabbitmq.svc"), url
    url = url.replace(host, rabbit_twin.address(1), 1)
    token = base64.b64encode(f"{params['username']}:{params['password']}".encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return meta, response.read().decode()


def _worker_metrics(address: str, port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}:{port}/metrics", timeout=10) as response:
        page = response.read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in page.splitlines()
        if line.startswith("celery_")
    }


def _publish(
    workers_factory: Callable[..., Workers], cluster: StatefulSetTwin, n: int, step: float
) -> None:
    """The scheduler on this host: ``n`` count tasks of ``step`` s steps, confirmed."""
    group = workers_factory(
        DEPLOYMENT_QUEUE, broker_urls=cluster.broker_urls(by_address=True), step_seconds=step
    )
    out = group.publish(n, group.workdir / f"ids-{step}.txt")
    assert f"published={n} failed=0" in out, out


def test_kedas_query_counts_unacked_tasks_and_the_worker_counts_its_own(
    rabbit_twin: StatefulSetTwin,
    worker_pods: Callable[..., WorkerPods],
    workers_factory: Callable[..., Workers],
) -> None:
    group = worker_pods(rabbit_twin, 0.0)
    pod = group.start(0)
    group.wait_consuming(pod)
    (container,) = rabbit_twin.deployment["spec"]["template"]["spec"]["containers"]
    (port,) = [int(p["containerPort"]) for p in container["ports"] if p["name"] == "metrics"]
    concurrency = int(rabbit_twin.worker_env()["CELERY_CONCURRENCY"])
    address = rabbit_twin.network.address_of(pod.name)
    succeeded = 'celery_tasks_succeeded_total{task="app.tasks.count"}'
    _publish(workers_factory, rabbit_twin, QUICK_TASKS, 0.0)
    deadline = time.monotonic() + 30
    while _worker_metrics(address, port).get(succeeded, 0) < QUICK_TASKS:
        assert time.monotonic() < deadline, "the quick tasks never finished"
        time.sleep(0.2)
    # Slow tasks: the pod takes what its threads run (unacked, late acks), the rest
    # stays ready; KEDA's QueueLength must count both.
    _publish(workers_factory, rabbit_twin, SLOW_TASKS, 30.0)
    deadline = time.monotonic() + 30
    while True:
        meta, body = _queue_depth(rabbit_twin)
        queue = json.loads(body)
        if queue.get("messages_unacknowledged", 0) >= concurrency and queue["messages"] == (
            SLOW_TASKS
        ):
            break
        assert time.monotonic() < deadline, f"queue never settled: {body[:400]}"
        time.sleep(0.5)
    print(
        f"\nKEDA-QUERY messages={queue['messages']} ready={queue['messages_ready']} "
        f"unacked={queue['messages_unacknowledged']} target/replica={meta['value']}"
    )
    # What the scaler divides by `value`: ready AND unacked (excludeUnacknowledged false).
    assert meta["excludeUnacknowledged"] == "false"
    assert queue["messages"] == queue["messages_ready"] + queue["messages_unacknowledged"]
    assert queue["messages_ready"] == SLOW_TASKS - concurrency
    metrics = _worker_metrics(address, port)
    name = '{task="app.tasks.count"}'
    assert metrics[f"celery_tasks_received_total{name}"] == QUICK_TASKS + concurrency
    assert metrics[f"celery_tasks_started_total{name}"] == QUICK_TASKS + concurrency
    assert metrics[f"celery_tasks_succeeded_total{name}"] == QUICK_TASKS
    assert metrics[f"celery_tasks_running{name}"] == concurrency
    assert metrics[f"celery_task_runtime_seconds_count{name}"] == QUICK_TASKS
    assert metrics.get(f"celery_tasks_failed_total{name}", 0) == 0
    assert metrics.get(f"celery_tasks_redelivered_total{name}", 0) == 0


def test_kedas_user_reads_statistics_and_nothing_else(rabbit_twin: StatefulSetTwin) -> None:
    """The scaler's credentials: the queue's statistics yes, its messages and AMQP no."""
    rendered = rabbit_twin.rendered
    secret = rendered.data("Secret", autoscaling.MONITOR_SECRET, "workers")
    user, password = secret["username"], secret["password"]
    base = f"http://{rabbit_twin.address(0)}:15672/api"
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    headers = {"Authorization": f"Basic {token}", "content-type": "application/json"}

    def call(path: str, body: dict[str, Any] | None = None) -> int:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{base}{path}", data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return error.code

    assert call("/queues/celery") == 200  # the vhost's queue list: KEDA's view
    # Reading messages off a queue (basic.get through the API) needs read permission.
    get = {"count": 1, "ackmode": "ack_requeue_true", "encoding": "auto"}
    assert call("/queues/celery/dead-letter/get", get) in (401, 403)
    assert call("/exchanges/celery/amq.default/publish", {}) in (400, 401, 403)
    assert call("/users") in (401, 403)  # no administrator view
    amqp = rabbit_twin.broker_urls(by_address=True)[0]
    amqp = re.sub(r"//[^@]*@", f"//{user}:{password}@", amqp)
    conn = Connection(amqp, connect_timeout=5)
    try:
        with pytest.raises(Exception, match=r"ACCESS_REFUSED|403|access"):
            conn.default_channel.queue_declare("keda-probe", auto_delete=True)
    finally:
        conn.release()
