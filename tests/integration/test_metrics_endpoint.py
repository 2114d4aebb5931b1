"""The alert rules read metrics RabbitMQ really serves: the session twin's RabbitMQ
4.3.6 pods are scraped as the PodMonitorings say (port, path, params), and every
metric name the rules use (components/monitoring.py) is on those pages, with the
labels the rules match on.
"""

from __future__ import annotations

import re
import time
import urllib.parse
import urllib.request
from typing import Any

from kombu import Connection

from components import monitoring
from components.config import load_stack_config
from localcluster.twin import StatefulSetTwin
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
        if m["kind"] == "PodMonitoring"
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
