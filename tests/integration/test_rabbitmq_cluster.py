"""A real 3-node RabbitMQ cluster, configured by components/rabbitmq_conf.py, read back.

Everything asserted here is read from the running nodes (rabbitmqctl, AMQP), not
from the rendered text: the cluster formed, pause_minority is in effect on every
node, the application user exists and guest does not, the definitions were
imported, a quorum queue declared through kombu is replicated on all three nodes
and a poison message is dead-lettered after the policy's delivery limit.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import pytest
from amqp.exceptions import AccessRefused
from kombu import Connection, Exchange, Queue

from components.rabbitmq_conf import LocalDiscovery, parse_version, rabbitmq_conf
from localcluster.rabbit import (
    INSTALL_COMMAND,
    ClusterError,
    LocalRabbitCluster,
    RabbitMQNotInstalledError,
)

pytestmark = pytest.mark.rabbitmq


def _json(output: str) -> list[dict[str, object]]:
    data = json.loads(output)
    assert isinstance(data, list), data
    return data


def _queues(cluster: LocalRabbitCluster, *items: str) -> dict[str, dict[str, object]]:
    rows = _json(
        cluster.rabbitmqctl(0, "list_queues", "-p", cluster.vhost, *items, "--formatter", "json")
    )
    return {str(row["name"]): row for row in rows}


def _declare_quorum_queue(cluster: LocalRabbitCluster, name: str, url_index: int = 0) -> None:
    exchange = Exchange(name, type="direct", durable=True)
    queue = Queue(
        name,
        exchange,
        routing_key=name,
        durable=True,
        queue_arguments={"x-queue-type": "quorum"},
    )
    with Connection(cluster.broker_urls()[url_index], connect_timeout=10) as conn:
        queue(conn.default_channel).declare()


def _management_get(cluster: LocalRabbitCluster, i: int, path: str, want: str) -> dict[str, object]:
    """GET from node i's management API as the app user, until the answer has ``want``.

    Queue statistics (and with them the effective policy) reach the management
    database every few seconds, so a fresh queue needs a moment.
    """
    url = f"http://127.0.0.1:{cluster.management_ports[i]}{quote(path, safe='/')}"
    token = base64.b64encode(f"{cluster.username}:{cluster.password}".encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                data = json.loads(response.read())
            assert isinstance(data, dict), data
            if want in data:
                return data
        except urllib.error.HTTPError as exc:  # 404 until the stats catch up
            if exc.code != 404:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"{url}: no {want!r} after 20 s")
        time.sleep(0.5)


def test_rendered_config_is_the_renderers_output(rabbit_cluster: LocalRabbitCluster) -> None:
    for i in range(rabbit_cluster.size):
        expected = rabbitmq_conf(
            rabbit_cluster.version,
            LocalDiscovery(tuple(rabbit_cluster.node_names)),
            amqp_port=rabbit_cluster.amqp_ports[i],
            management_port=rabbit_cluster.management_ports[i],
            prometheus_port=rabbit_cluster.prometheus_ports[i],
            disk_free_limit=rabbit_cluster.disk_free_limit,
            definitions_path=str(rabbit_cluster.config_file(i).parent.parent / "definitions.json"),
        )
        assert rabbit_cluster.config_file(i).read_text() == expected


def test_three_nodes_running_and_clustered(rabbit_cluster: LocalRabbitCluster) -> None:
    expected = sorted(rabbit_cluster.node_names)
    assert len(expected) == 3
    for i in range(3):
        status = rabbit_cluster.cluster_status(i)
        assert sorted(map(str, status["running_nodes"])) == expected  # type: ignore[call-overload]
        assert sorted(map(str, status["disk_nodes"])) == expected  # type: ignore[call-overload]
        assert not status.get("partitions")


def test_pause_minority_in_effect_on_every_node(rabbit_cluster: LocalRabbitCluster) -> None:
    if parse_version(rabbit_cluster.version) >= (4, 3, 0):
        pytest.fail("RabbitMQ 4.3+ has no cluster_partition_handling: adapt this test")
    for i in range(3):
        out = rabbit_cluster.rabbitmqctl(
            i, "eval", "application:get_env(rabbit, cluster_partition_handling)."
        )
        assert out.strip() == "{ok,pause_minority}", (rabbit_cluster.node_names[i], out)


def test_app_user_exists_and_guest_does_not(rabbit_cluster: LocalRabbitCluster) -> None:
    users = {
        str(row["user"]): row
        for row in _json(rabbit_cluster.rabbitmqctl(0, "list_users", "--formatter", "json"))
    }
    assert set(users) == {rabbit_cluster.username}
    assert "guest" not in users
    # The password (hashed into the definitions) works over AMQP, on every node.
    for url in rabbit_cluster.broker_urls():
        with Connection(url, connect_timeout=10) as conn:
            conn.connect()
    # ... and guest cannot log in.
    guest = rabbit_cluster.broker_urls()[0].replace(
        f"{rabbit_cluster.username}:{rabbit_cluster.password}", "guest:guest"
    )
    with pytest.raises(AccessRefused), Connection(guest, connect_timeout=5) as conn:
        conn.connect()
    perms = _json(
        rabbit_cluster.rabbitmqctl(
            0, "list_permissions", "-p", rabbit_cluster.vhost, "--formatter", "json"
        )
    )
    assert perms == [
        {"user": rabbit_cluster.username, "configure": ".*", "write": ".*", "read": ".*"}
    ]


def test_definitions_were_imported(rabbit_cluster: LocalRabbitCluster) -> None:
    policies = _json(
        rabbit_cluster.rabbitmqctl(
            0, "list_policies", "-p", rabbit_cluster.vhost, "--formatter", "json"
        )
    )
    (policy,) = [p for p in policies if p["name"] == "quorum-delivery-limit"]
    definition = policy["definition"]
    if isinstance(definition, str):  # some CLI versions print it as a JSON string
        definition = json.loads(definition)
    assert definition == {
        "delivery-limit": rabbit_cluster.delivery_limit,
        "dead-letter-exchange": "dlx",
    }
    exchanges = _json(
        rabbit_cluster.rabbitmqctl(
            0, "list_exchanges", "-p", rabbit_cluster.vhost, "name", "type", "--formatter", "json"
        )
    )
    assert {"name": "dlx", "type": "fanout"} in exchanges
    dead_letter = _queues(rabbit_cluster, "name", "type", "members")["dead-letter"]
    assert dead_letter["type"] == "quorum"
    # Imported once all 3 nodes were up (target_cluster_size_hint), so 3 replicas.
    assert sorted(map(str, dead_letter["members"])) == sorted(rabbit_cluster.node_names)  # type: ignore[call-overload]


def test_kombu_quorum_queue_is_replicated_and_gets_the_delivery_limit(
    rabbit_cluster: LocalRabbitCluster,
) -> None:
    name = f"test-qq-{uuid.uuid4().hex[:8]}"
    _declare_quorum_queue(rabbit_cluster, name)
    row = _queues(rabbit_cluster, "name", "type", "members", "policy")[name]
    assert row["type"] == "quorum"
    assert sorted(map(str, row["members"])) == sorted(rabbit_cluster.node_names)  # type: ignore[call-overload]
    assert row["policy"] == "quorum-delivery-limit"
    # The effective policy, as the management API reports it (read with the app user,
    # whose 'management' tag allows it), from another node than the one declaring.
    details = _management_get(
        rabbit_cluster,
        2,
        f"/api/queues/{rabbit_cluster.vhost}/{name}",
        "effective_policy_definition",
    )
    effective = details["effective_policy_definition"]
    assert isinstance(effective, dict)
    assert effective["delivery-limit"] == rabbit_cluster.delivery_limit
    assert effective["dead-letter-exchange"] == "dlx"


def test_poison_message_is_dead_lettered_after_the_delivery_limit(
    rabbit_cluster: LocalRabbitCluster,
) -> None:
    """A message whose consumer keeps dying is dead-lettered, not redelivered forever."""
    name = f"test-poison-{uuid.uuid4().hex[:8]}"
    _declare_quorum_queue(rabbit_cluster, name)
    body = f"poison {name}"
    url = rabbit_cluster.broker_urls()[1]
    with Connection(url, connect_timeout=10) as conn:
        producer = conn.Producer(serializer="json")
        producer.publish(body, exchange=name, routing_key=name, confirm=True, retry=True)
    deliveries = 0
    for _ in range(rabbit_cluster.delivery_limit + 3):
        with Connection(url, connect_timeout=10) as conn:
            channel = conn.channel()
            message = None
            deadline = time.monotonic() + 5
            while message is None and time.monotonic() < deadline:
                message = channel.basic_get(name, no_ack=False)
                if message is None:
                    time.sleep(0.05)
            if message is None:
                break
            deliveries += 1
            # The connection closes without an ack: like a worker killed mid-task.
    # 1 delivery + delivery_limit redeliveries, then it is dead-lettered.
    assert deliveries == rabbit_cluster.delivery_limit + 1

    def dead_letter_depth() -> int:
        rows = _queues(rabbit_cluster, "name", "messages")
        return int(rows["dead-letter"]["messages"])  # type: ignore[call-overload]

    deadline = time.monotonic() + 10
    while dead_letter_depth() < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert dead_letter_depth() >= 1
    assert int(_queues(rabbit_cluster, "name", "messages")[name]["messages"]) == 0  # type: ignore[call-overload]
    # It is our message; drain the shared dead-letter queue for other tests.
    drained = []
    with Connection(url, connect_timeout=10) as conn:
        channel = conn.channel()
        while (message := channel.basic_get("dead-letter", no_ack=True)) is not None:
            drained.append(message)
    bodies = [m.body if isinstance(m.body, str) else m.body.decode() for m in drained]
    assert any(body in text for text in bodies), bodies
    assert any(m.headers.get("x-death") for m in drained)


def test_killed_node_comes_back_and_rejoins(rabbit_cluster: LocalRabbitCluster) -> None:
    name = f"test-kill-{uuid.uuid4().hex[:8]}"
    _declare_quorum_queue(rabbit_cluster, name)
    victim = 2
    victim_name = rabbit_cluster.node_names[victim]
    old_pids = rabbit_cluster.node_pids(victim)
    assert old_pids
    t0 = time.monotonic()
    rabbit_cluster.kill_node(victim)
    try:
        assert not rabbit_cluster.is_running(victim)
        assert not [p for p in old_pids if Path(f"/proc/{p}").exists()], "SIGKILL left processes"
        others = sorted(n for n in rabbit_cluster.node_names if n != victim_name)
        deadline = time.monotonic() + 30
        while rabbit_cluster.running_nodes(0) != others and time.monotonic() < deadline:
            time.sleep(0.2)
        assert rabbit_cluster.running_nodes(0) == others
        # The majority keeps serving: the quorum queue still takes messages.
        with Connection(rabbit_cluster.broker_urls()[0], connect_timeout=10) as conn:
            conn.Producer().publish("while down", exchange=name, routing_key=name, confirm=True)
    finally:
        rabbit_cluster.start_node(victim)  # waits until all three are running again
    back_after = time.monotonic() - t0
    assert rabbit_cluster.running_nodes(victim) == sorted(rabbit_cluster.node_names)
    assert not (rabbit_cluster.node_pids(victim) & old_pids)
    row = _queues(rabbit_cluster, "name", "members", "messages")[name]
    assert sorted(map(str, row["members"])) == sorted(rabbit_cluster.node_names)  # type: ignore[call-overload]
    assert row["messages"] == 1
    print(f"{victim_name} killed and back in the cluster after {back_after:.1f} s")


def test_close_leaves_no_process(make_rabbit_cluster: Callable[..., LocalRabbitCluster]) -> None:
    cluster = make_rabbit_cluster(size=1)
    cluster.start()
    pids = cluster.pids()
    names = {Path(f"/proc/{p}/comm").read_text().strip() for p in pids}
    assert {"epmd", "beam.smp"} <= names, names
    base_dir = cluster.base_dir
    assert base_dir is not None and base_dir.exists()
    cluster.close()
    assert [p for p in pids if Path(f"/proc/{p}").exists()] == []
    assert cluster.pids() == []
    assert not base_dir.exists()
    cluster.close()  # idempotent


def test_close_after_a_failed_start(make_rabbit_cluster: Callable[..., LocalRabbitCluster]) -> None:
    cluster = make_rabbit_cluster(size=2)
    with pytest.raises(ClusterError):
        cluster.start(timeout=0.5)  # spawns the nodes, then gives up
    assert cluster.pids() == []
    cluster.close()
    assert cluster.pids() == []


def test_missing_rabbitmq_names_the_install_command(
    make_rabbit_cluster: Callable[..., LocalRabbitCluster], tmp_path: Path
) -> None:
    cluster = make_rabbit_cluster(size=1, rabbitmq_home=tmp_path / "nowhere", version="3.10.8")
    with pytest.raises(RabbitMQNotInstalledError) as excinfo:
        cluster.start()
    assert INSTALL_COMMAND in str(excinfo.value)
    assert "rabbitmq-server" in str(excinfo.value)
    cluster.close()
