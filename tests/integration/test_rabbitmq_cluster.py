"""The RabbitMQ that ships, configured by components/rabbitmq_conf.py, read back.

The session's ``rabbit_twin`` (tests/integration/conftest.py): the prod stack's own
rendered StatefulSet as three RabbitMQ 4.3 pods. Everything asserted here is read from
the running pods (rabbitmqctl and rabbitmq-diagnostics exec'd in a pod; AMQP and the
management API from this host, by pod address), not from the rendered text: 4.3's
partition handling is Khepri's Raft majority (no ``cluster_partition_handling``), the
application user exists and guest does not, the definitions were imported, a quorum
queue declared through kombu is replicated on all three pods with the policy's
delivery limit, and a poison message is dead-lettered after that limit.

Proved in test_pod_twin.py and not repeated here: every mounted file is the rendered
object byte for byte, the three pods form one cluster, a killed pod comes back on its
volume and rejoins, a failing run leaves nothing behind.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from amqp.exceptions import AccessRefused
from kombu import Connection, Exchange, Queue

from components.rabbitmq import MONITOR_USERNAME
from components.rabbitmq_conf import supports_partition_handling
from localcluster import rootfs, twin
from localcluster.twin import StatefulSetTwin
from tests.integration.conftest import delete_queue

MANAGEMENT_PORT = 15672


def _json(output: str) -> list[dict[str, Any]]:
    data = json.loads(output)
    assert isinstance(data, list), data
    return data


def _secret(cluster: StatefulSetTwin) -> dict[str, str]:
    return cluster.rendered.data("Secret", "rabbitmq-credentials", cluster.namespace)


def _vhost(cluster: StatefulSetTwin) -> str:
    return _secret(cluster)["vhost"]


def _node_names(cluster: StatefulSetTwin) -> list[str]:
    return sorted(
        f"rabbit@{name}.{cluster.service}.{cluster.namespace}" for name in cluster.pod_names
    )


def _policy(cluster: StatefulSetTwin) -> dict[str, Any]:
    """The quorum-queue policy's definition as the rendered definitions.json has it."""
    definitions = json.loads(_secret(cluster)["definitions.json"])
    (policy,) = [p for p in definitions["policies"] if p["name"] == "quorum-delivery-limit"]
    definition = policy["definition"]
    assert isinstance(definition, dict)
    return definition


def _queues(cluster: StatefulSetTwin, *items: str) -> dict[str, dict[str, Any]]:
    rows = _json(
        cluster.rabbitmqctl(0, "list_queues", "-p", _vhost(cluster), *items, "--formatter", "json")
    )
    return {str(row["name"]): row for row in rows}


def _declare_quorum_queue(cluster: StatefulSetTwin, name: str, url_index: int = 0) -> None:
    exchange = Exchange(name, type="direct", durable=True)
    queue = Queue(
        name,
        exchange,
        routing_key=name,
        durable=True,
        queue_arguments={"x-queue-type": "quorum"},
    )
    url = cluster.broker_urls(by_address=True)[url_index]
    with Connection(url, connect_timeout=10) as conn:
        queue(conn.default_channel).declare()


def _management_get(cluster: StatefulSetTwin, i: int, path: str, want: str) -> dict[str, Any]:
    """GET from pod i's management API as the app user, until the answer has ``want``.

    Queue statistics (and with them the effective policy) reach the management
    database every few seconds, so a fresh queue needs a moment.
    """
    url = f"http://{cluster.address(i)}:{MANAGEMENT_PORT}{quote(path, safe='/')}"
    secret = _secret(cluster)
    token = base64.b64encode(f"{secret['username']}:{secret['password']}".encode()).decode()
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


def test_partitions_are_khepris_raft_majority_not_a_config_key(
    rabbit_twin: StatefulSetTwin,
) -> None:
    """4.3 removed Mnesia and ``cluster_partition_handling`` with it: the renderer leaves
    the key out for 4.3, no pod has it set, and the metadata store every pod runs is
    Khepri, one Raft cluster of all three pods as voters with one leader."""
    version = rabbit_twin.rabbitmqctl(0, "version").strip()
    assert version == rootfs.for_version(rabbit_twin.version).upstream_version
    assert not supports_partition_handling(version)
    for pod in rabbit_twin.pods.values():
        conf = pod.exec(["cat", "/etc/rabbitmq/rabbitmq.conf"]).stdout
        keys = [line.split("=")[0].strip() for line in conf.splitlines() if "=" in line]
        assert "cluster_formation.peer_discovery_backend" in keys
        assert "cluster_partition_handling" not in keys
    # Every running node, asked at once from pod 0.
    got = rabbit_twin.rabbitmqctl(
        0, "eval", "rpc:multicall(application, get_env, [rabbit, cluster_partition_handling])."
    )
    assert got.strip() == "{[undefined,undefined,undefined],[]}", got
    flags = _json(
        rabbit_twin.rabbitmqctl(0, "list_feature_flags", "name", "state", "--formatter", "json")
    )
    assert {"name": "khepri_db", "state": "enabled"} in flags
    store = _json(
        rabbit_twin.rabbitmq_diagnostics(0, "metadata_store_status", "--formatter", "json")
    )
    assert sorted(row["Node Name"] for row in store) == _node_names(rabbit_twin)
    assert {row["Membership"] for row in store} == {"voter"}
    assert sorted(row["Raft State"] for row in store) == ["follower", "follower", "leader"]


def test_app_and_keda_users_exist_and_guest_does_not(rabbit_twin: StatefulSetTwin) -> None:
    secret = _secret(rabbit_twin)
    username, password, vhost = secret["username"], secret["password"], secret["vhost"]
    users = {
        str(row["user"]): row
        for row in _json(rabbit_twin.rabbitmqctl(0, "list_users", "--formatter", "json"))
    }
    # The application's user, and KEDA's (the prod stack autoscales): nobody else.
    assert set(users) == {username, MONITOR_USERNAME}
    assert users[username]["tags"] == ["management"]
    assert users[MONITOR_USERNAME]["tags"] == ["management"]
    # The password (hashed into the definitions) works over AMQP, on every pod.
    urls = rabbit_twin.broker_urls(by_address=True)
    assert len(urls) == len(rabbit_twin.pod_names)
    for url in urls:
        with Connection(url, connect_timeout=10) as conn:
            conn.connect()
    # ... and guest cannot log in.
    guest = urls[0].replace(f"{username}:{password}", "guest:guest")
    assert guest != urls[0]
    with pytest.raises(AccessRefused), Connection(guest, connect_timeout=5) as conn:
        conn.connect()
    perms = _json(
        rabbit_twin.rabbitmqctl(0, "list_permissions", "-p", vhost, "--formatter", "json")
    )
    assert sorted(perms, key=lambda p: str(p["user"])) == [
        {"user": username, "configure": ".*", "write": ".*", "read": ".*"},
        {"user": MONITOR_USERNAME, "configure": "", "write": "", "read": ""},
    ]


def test_definitions_were_imported(rabbit_twin: StatefulSetTwin) -> None:
    policies = _json(
        rabbit_twin.rabbitmqctl(
            0, "list_policies", "-p", _vhost(rabbit_twin), "--formatter", "json"
        )
    )
    (policy,) = [p for p in policies if p["name"] == "quorum-delivery-limit"]
    definition = policy["definition"]
    if isinstance(definition, str):  # 4.3's CLI prints it as a JSON string
        definition = json.loads(definition)
    assert definition == {
        "delivery-limit": _policy(rabbit_twin)["delivery-limit"],
        "dead-letter-exchange": "dlx",
    }
    assert policy["apply-to"] == "quorum_queues"
    exchanges = _json(
        rabbit_twin.rabbitmqctl(
            0, "list_exchanges", "-p", _vhost(rabbit_twin), "name", "type", "--formatter", "json"
        )
    )
    assert {"name": "dlx", "type": "fanout"} in exchanges
    dead_letter = _queues(rabbit_twin, "name", "type", "members")["dead-letter"]
    assert dead_letter["type"] == "quorum"
    assert sorted(map(str, dead_letter["members"])) == _node_names(rabbit_twin)


def test_kombu_quorum_queue_is_replicated_and_gets_the_delivery_limit(
    rabbit_twin: StatefulSetTwin,
) -> None:
    name = f"test-qq-{uuid.uuid4().hex[:8]}"
    _declare_quorum_queue(rabbit_twin, name)
    row = _queues(rabbit_twin, "name", "type", "members", "policy")[name]
    assert row["type"] == "quorum"
    assert sorted(map(str, row["members"])) == _node_names(rabbit_twin)
    assert row["policy"] == "quorum-delivery-limit"
    # The effective policy, as the management API reports it (read with the app user,
    # whose 'management' tag allows it), from another pod than the one declaring.
    details = _management_get(
        rabbit_twin, 2, f"/api/queues/{_vhost(rabbit_twin)}/{name}", "effective_policy_definition"
    )
    effective = details["effective_policy_definition"]
    assert isinstance(effective, dict)
    assert effective["delivery-limit"] == _policy(rabbit_twin)["delivery-limit"]
    assert effective["dead-letter-exchange"] == "dlx"
    delete_queue(rabbit_twin, name)


def test_poison_message_is_dead_lettered_after_the_delivery_limit(
    rabbit_twin: StatefulSetTwin,
) -> None:
    """A message whose consumer keeps dying is dead-lettered, not redelivered forever.

    On 4.3 too a message returned by a connection that closed without an ack counts
    towards the delivery limit (1 delivery + delivery-limit redeliveries)."""
    limit = int(_policy(rabbit_twin)["delivery-limit"])
    name = f"test-poison-{uuid.uuid4().hex[:8]}"
    _declare_quorum_queue(rabbit_twin, name)
    body = f"poison {name}"
    url = rabbit_twin.broker_urls(by_address=True)[1]
    with Connection(url, connect_timeout=10) as conn:
        producer = conn.Producer(serializer="json")
        producer.publish(body, exchange=name, routing_key=name, confirm=True, retry=True)
    deliveries = 0
    for _ in range(limit + 3):
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
    assert deliveries == limit + 1

    def dead_letter_depth() -> int:
        return int(_queues(rabbit_twin, "name", "messages")["dead-letter"]["messages"])

    deadline = time.monotonic() + 10
    while dead_letter_depth() < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert dead_letter_depth() >= 1
    assert int(_queues(rabbit_twin, "name", "messages")[name]["messages"]) == 0
    # It is our message; drain the shared dead-letter queue for other tests.
    drained = []
    with Connection(url, connect_timeout=10) as conn:
        channel = conn.channel()
        while (message := channel.basic_get("dead-letter", no_ack=True)) is not None:
            drained.append(message)
    bodies = [m.body if isinstance(m.body, str) else m.body.decode() for m in drained]
    assert any(body in text for text in bodies), bodies
    assert any(m.headers.get("x-death") for m in drained)
    delete_queue(rabbit_twin, name)


def test_a_missing_root_filesystem_names_the_command_that_builds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No skipping: a twin whose RabbitMQ root is not built fails saying how to build it."""
    monkeypatch.setenv(rootfs.CACHE_ENV, str(tmp_path / "empty-cache"))
    with pytest.raises(twin.TwinError) as excinfo:
        twin._root_for("4.3")
    message = str(excinfo.value)
    assert "rabbitmq-4.3" in message and "not built" in message
    assert "make setup" in message and "localcluster.rootfs" in message
