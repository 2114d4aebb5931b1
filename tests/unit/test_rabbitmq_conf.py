"""Unit tests for the RabbitMQ configuration renderer (no broker needed)."""

from __future__ import annotations

import base64
import hashlib
import json
import re

import pytest

from components.rabbitmq_conf import (
    KubernetesDiscovery,
    LocalDiscovery,
    default_user_conf,
    definitions_json,
    enabled_plugins,
    memory_available,
    needs_kubernetes_api,
    parse_version,
    rabbitmq_conf,
    rabbitmq_password_hash,
    supports_partition_handling,
    supports_queue_type_policies,
)

K8S = KubernetesDiscovery(headless_service="rabbitmq-nodes", namespace="rabbitmq", cluster_size=3)
LOCAL = LocalDiscovery(nodes=("rmq0@localhost", "rmq1@localhost", "rmq2@localhost"))
WITH_PARTITION_HANDLING = ["3.10.8", "3.13.7", "4.0.9", "4.2.3", "4.2.0-management"]
WITHOUT_PARTITION_HANDLING = ["4.3.0", "4.3.2-management", "4.4.1"]
ALL_VERSIONS = WITH_PARTITION_HANDLING + WITHOUT_PARTITION_HANDLING


def settings(conf: str) -> dict[str, str]:
    """key -> value of a rendered rabbitmq.conf; fails on duplicate keys or odd lines."""
    result: dict[str, str] = {}
    for line in conf.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition(" = ")
        assert sep, f"not a 'key = value' line: {line!r}"
        assert key not in result, f"duplicate key {key!r}"
        assert "#" not in value, f"'#' would start a comment in {line!r}"
        result[key] = value
    return result


def without_discovery(conf: str) -> str:
    """The rendered text minus the peer-discovery section (header to blank line)."""
    return re.sub(r"## Peer discovery.*?\n\n", "", conf, count=1, flags=re.DOTALL)


# --------------------------------------------------------------------- versions
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3.10.8", (3, 10, 8)),
        ("4.1.4", (4, 1, 4)),
        ("4.1.4-management", (4, 1, 4)),
        ("3.10.8-1.1+deb12u1", (3, 10, 8)),
        ("1:3.10.8-1", (3, 10, 8)),
        ("3.13", (3, 13, 0)),
        (" 4.0.5 ", (4, 0, 5)),
    ],
)
def test_parse_version(text: str, expected: tuple[int, int, int]) -> None:
    assert parse_version(text) == expected


@pytest.mark.parametrize("bad", ["", "latest", "management", "3", "v3.10.8", "3.x.1", "3.10.8abc"])
def test_bad_versions_raise_with_the_value(bad: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        parse_version(bad)
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        rabbitmq_conf(bad, K8S)


def test_too_old_version_is_refused() -> None:
    with pytest.raises(ValueError, match=r"'3\.7\.28'"):
        rabbitmq_conf("3.7.28", K8S)


@pytest.mark.parametrize("version", WITH_PARTITION_HANDLING)
def test_pause_minority_up_to_4_2(version: str) -> None:
    assert supports_partition_handling(version)
    for discovery in (K8S, LOCAL):
        assert settings(rabbitmq_conf(version, discovery))["cluster_partition_handling"] == (
            "pause_minority"
        )


@pytest.mark.parametrize("version", WITHOUT_PARTITION_HANDLING)
def test_no_partition_handling_key_from_4_3(version: str) -> None:
    assert not supports_partition_handling(version)
    for discovery in (K8S, LOCAL):
        conf = rabbitmq_conf(version, discovery)
        assert "cluster_partition_handling" not in settings(conf)
        assert not re.search(r"^\s*cluster_partition_handling", conf, flags=re.MULTILINE)


# -------------------------------------------------------------- k8s vs local
@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_k8s_and_local_differ_only_in_discovery(version: str) -> None:
    path = "/etc/rabbitmq/definitions.json"
    k8s = rabbitmq_conf(version, K8S, definitions_path=path)
    local = rabbitmq_conf(version, LOCAL, definitions_path=path)
    assert k8s != local
    assert without_discovery(k8s) == without_discovery(local)
    for conf in (k8s, local):
        assert "## Peer discovery" in conf
        assert "cluster_formation" not in without_discovery(conf)


@pytest.mark.parametrize("version", ["3.10.8", "3.13.7", "4.0.9"])
def test_k8s_discovery_before_4_1_uses_the_api(version: str) -> None:
    conf = settings(rabbitmq_conf(version, K8S))
    assert conf["cluster_formation.peer_discovery_backend"] == "rabbit_peer_discovery_k8s"
    assert conf["cluster_formation.k8s.host"] == "kubernetes.default"
    assert conf["cluster_formation.k8s.address_type"] == "hostname"
    assert conf["cluster_formation.k8s.service_name"] == "rabbitmq-nodes"
    assert conf["cluster_formation.k8s.hostname_suffix"] == ".rabbitmq-nodes.rabbitmq"
    assert conf["cluster_formation.target_cluster_size_hint"] == "3"


@pytest.mark.parametrize("version", ["4.1.0", "4.1.4-management", "4.2.3", "4.3.0", "4.4.1"])
def test_k8s_discovery_from_4_1_needs_no_api_keys(version: str) -> None:
    conf = settings(rabbitmq_conf(version, K8S))
    assert conf["cluster_formation.peer_discovery_backend"] == "rabbit_peer_discovery_k8s"
    assert conf["cluster_formation.target_cluster_size_hint"] == "3"
    # Accepted but ignored by the 4.1 plugin: not rendered.
    assert not [key for key in conf if key.startswith("cluster_formation.k8s.")]


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_local_discovery_lists_the_nodes(version: str) -> None:
    conf = settings(rabbitmq_conf(version, LOCAL))
    assert conf["cluster_formation.peer_discovery_backend"] == "classic_config"
    assert [conf[f"cluster_formation.classic_config.nodes.{i}"] for i in (1, 2, 3)] == list(
        LOCAL.nodes
    )
    assert conf["cluster_formation.target_cluster_size_hint"] == "3"
    assert not [key for key in conf if key.startswith("cluster_formation.k8s")]


def test_listeners_and_limits() -> None:
    conf = settings(
        rabbitmq_conf(
            "3.13.7",
            LOCAL,
            amqp_port=5700,
            management_port=15700,
            prometheus_port=15800,
            disk_free_limit="50MB",
        )
    )
    assert conf["listeners.tcp.default"] == "5700"
    assert conf["management.tcp.port"] == "15700"
    assert conf["prometheus.tcp.port"] == "15800"
    assert conf["disk_free_limit.absolute"] == "50MB"
    defaults = settings(rabbitmq_conf("3.13.7", K8S))
    assert defaults["listeners.tcp.default"] == "5672"
    assert defaults["management.tcp.port"] == "15672"
    assert defaults["prometheus.tcp.port"] == "15692"
    assert defaults["disk_free_limit.absolute"] == "2GB"
    assert defaults["log.console"] == "true"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"amqp_port": 0},
        {"management_port": 70000},
        {"amqp_port": 15672},  # same as the management port
        {"disk_free_limit": "2 GB # lots"},
        {"definitions_path": "definitions.json"},
        {"net_ticktime": 0},
        {"net_ticktime": True},
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        rabbitmq_conf("3.13.7", K8S, **kwargs)  # type: ignore[arg-type]


def test_definitions_keys_only_with_a_path() -> None:
    assert not [key for key in settings(rabbitmq_conf("4.1.4", K8S)) if "definitions" in key]
    conf = settings(rabbitmq_conf("4.1.4", K8S, definitions_path="/etc/rabbitmq/defs.json"))
    assert conf["definitions.import_backend"] == "local_filesystem"
    assert conf["definitions.local.path"] == "/etc/rabbitmq/defs.json"
    assert "load_definitions" not in conf


@pytest.mark.parametrize(("version", "expected"), [("3.12.14", False), ("3.13.0", True)])
def test_quorum_membership_reconciliation_from_3_13(version: str, expected: bool) -> None:
    conf = settings(rabbitmq_conf(version, K8S))
    assert ("quorum_queue.continuous_membership_reconciliation.enabled" in conf) is expected
    if expected:
        assert conf["quorum_queue.continuous_membership_reconciliation.target_group_size"] == "3"


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_no_obsolete_or_guest_settings(version: str) -> None:
    conf = settings(rabbitmq_conf(version, K8S, definitions_path="/etc/rabbitmq/definitions.json"))
    text = "\n".join(f"{key} = {value}" for key, value in conf.items())
    for obsolete in ("loopback_users", "guest", "hipe_compile", "ha-mode", "default_user"):
        assert obsolete not in text


def test_discovery_validation() -> None:
    with pytest.raises(ValueError, match="cluster_size"):
        KubernetesDiscovery("rabbitmq-nodes", "rabbitmq", 0)
    with pytest.raises(ValueError, match="Rabbit_Nodes"):
        KubernetesDiscovery("Rabbit_Nodes", "rabbitmq", 3)
    with pytest.raises(ValueError, match="'rmq0'"):
        LocalDiscovery(("rmq0",))
    with pytest.raises(ValueError):
        LocalDiscovery(())
    with pytest.raises(ValueError, match="duplicate"):
        LocalDiscovery(("a@localhost", "a@localhost"))


# ---------------------------------------------------------------- other files
def test_enabled_plugins() -> None:
    assert enabled_plugins(K8S) == (
        "[rabbitmq_management,rabbitmq_prometheus,rabbitmq_peer_discovery_k8s].\n"
    )
    assert enabled_plugins(LOCAL) == "[rabbitmq_management,rabbitmq_prometheus].\n"


def test_default_user_conf() -> None:
    conf = settings(default_user_conf("celery", "s3cr3t-Pass_word", "celery"))
    assert conf["default_user"] == "celery"
    assert conf["default_pass"] == "s3cr3t-Pass_word"
    assert conf["default_vhost"] == "celery"
    assert conf["default_permissions.configure"] == ".*"
    assert "guest" not in "".join(conf.values())
    assert not [key for key in conf if key.startswith("loopback_users")]


@pytest.mark.parametrize("password", ["has#hash", "two\nlines", " padded", ""])
def test_default_user_conf_refuses_values_that_cannot_round_trip(password: str) -> None:
    with pytest.raises(ValueError, match="password"):
        default_user_conf("celery", password, "celery")


def test_password_hash_is_rabbitmq_sha256() -> None:
    encoded = rabbitmq_password_hash("s3cret", salt=b"\x01\x02\x03\x04")
    raw = base64.b64decode(encoded)
    assert raw[:4] == b"\x01\x02\x03\x04"
    assert raw[4:] == hashlib.sha256(b"\x01\x02\x03\x04s3cret").digest()
    # Deterministic by default: no diff (and no rolling restart) on every render.
    assert rabbitmq_password_hash("s3cret") == rabbitmq_password_hash("s3cret")
    assert rabbitmq_password_hash("s3cret") != rabbitmq_password_hash("other")


def _policy(doc: dict[str, list[dict[str, object]]]) -> dict[str, object]:
    (policy,) = doc["policies"]
    return policy


def test_definitions_json_topology() -> None:
    doc = json.loads(definitions_json("celery", delivery_limit=5))
    assert doc["vhosts"] == [{"name": "celery"}]
    policy = _policy(doc)
    assert policy["vhost"] == "celery"
    assert policy["apply-to"] == "quorum_queues"
    assert policy["definition"] == {"delivery-limit": 5, "dead-letter-exchange": "dlx"}
    (exchange,) = doc["exchanges"]
    assert (exchange["name"], exchange["type"], exchange["durable"]) == ("dlx", "fanout", True)
    (queue,) = doc["queues"]
    assert queue["name"] == "dead-letter"
    assert queue["arguments"] == {"x-queue-type": "quorum"}
    assert queue["durable"] is True
    (binding,) = doc["bindings"]
    assert (binding["source"], binding["destination"], binding["destination_type"]) == (
        "dlx",
        "dead-letter",
        "queue",
    )
    assert "users" not in doc
    assert "ha-mode" not in json.dumps(doc)


def test_definitions_policy_pattern_spares_the_dead_letter_queue() -> None:
    pattern = str(_policy(json.loads(definitions_json("celery", delivery_limit=3)))["pattern"])
    assert re.match(pattern, "celery")
    assert re.match(pattern, "dead-letter-not")
    assert not re.match(pattern, "dead-letter")


def test_definitions_before_3_12_apply_to_queues_but_not_celery_internals() -> None:
    assert not supports_queue_type_policies("3.11.28")
    assert supports_queue_type_policies("3.12.0")
    policy = _policy(json.loads(definitions_json("celery", delivery_limit=3, version="3.10.8")))
    assert policy["apply-to"] == "queues"
    pattern = str(policy["pattern"])
    assert re.match(pattern, "celery")
    for internal in ("dead-letter", "celeryev.1f6e", "celery@host.celery.pidbox", "x.reply.pidbox"):
        assert not re.match(pattern, internal), internal
    modern = _policy(json.loads(definitions_json("celery", delivery_limit=3, version="4.1.4")))
    assert modern["apply-to"] == "quorum_queues"


def test_definitions_with_the_app_user() -> None:
    doc = json.loads(
        definitions_json("celery", delivery_limit=5, username="celery", password="s3cret")
    )
    (user,) = doc["users"]
    assert user["name"] == "celery"
    assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
    raw = base64.b64decode(user["password_hash"])
    assert raw[4:] == hashlib.sha256(raw[:4] + b"s3cret").digest()
    assert "s3cret" not in json.dumps(doc)
    assert doc["permissions"] == [
        {"user": "celery", "vhost": "celery", "configure": ".*", "write": ".*", "read": ".*"}
    ]
    assert [u["name"] for u in doc["users"]] == ["celery"]  # no guest


def test_definitions_argument_checks() -> None:
    with pytest.raises(ValueError, match="delivery_limit"):
        definitions_json("celery", delivery_limit=0)
    with pytest.raises(ValueError, match="both"):
        definitions_json("celery", delivery_limit=5, username="celery")
    with pytest.raises(ValueError, match="amq"):
        definitions_json("celery", delivery_limit=5, dead_letter_exchange="amq.fanout")
    with pytest.raises(ValueError, match="'nope'"):
        definitions_json("celery", delivery_limit=5, version="nope")


def test_custom_dead_letter_names() -> None:
    doc = json.loads(
        definitions_json(
            "jobs", delivery_limit=2, dead_letter_exchange="jobs.dlx", dead_letter_queue="jobs.dlq"
        )
    )
    assert _policy(doc)["definition"] == {"delivery-limit": 2, "dead-letter-exchange": "jobs.dlx"}
    pattern = str(_policy(doc)["pattern"])
    assert not re.match(pattern, "jobs.dlq")
    assert re.match(pattern, "jobsXdlq")  # the '.' is escaped
    assert doc["bindings"][0]["source"] == "jobs.dlx"


@pytest.mark.parametrize(
    ("limit", "available"),
    [
        (256 * 2**20, 256 * 2**20 - (256 * 2**20) // 5),
        (4 * 2**30, 4 * 2**30 - (4 * 2**30) // 5),
        # 20 % would exceed 2 GiB: the headroom stops there.
        (16 * 2**30, 14 * 2**30),
    ],
)
def test_memory_available_keeps_the_operators_headroom(limit: int, available: int) -> None:
    assert memory_available(limit) == available
    conf = settings(rabbitmq_conf("4.3.6", K8S, container_memory_limit=limit))
    assert conf["total_memory_available_override_value"] == str(available)


def test_no_memory_override_without_a_limit_and_no_tiny_limits() -> None:
    assert "total_memory_available_override_value" not in settings(rabbitmq_conf("4.3.6", K8S))
    with pytest.raises(ValueError, match="container_memory_limit"):
        memory_available(1024)


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_only_password_mechanisms_are_offered(version: str) -> None:
    """4.x offers ANONYMOUS by default: the rendered file lists exactly two mechanisms."""
    conf = settings(rabbitmq_conf(version, K8S))
    assert {k: v for k, v in conf.items() if k.startswith("auth_mechanisms")} == {
        "auth_mechanisms.1": "PLAIN",
        "auth_mechanisms.2": "AMQPLAIN",
    }


def test_disk_free_limit_in_bytes() -> None:
    conf = settings(rabbitmq_conf("4.3.6", K8S, disk_free_limit=5 * 10**9))
    assert conf["disk_free_limit.absolute"] == "5000000000"
    for bad in (0, -1, True, "2 GB"):
        with pytest.raises(ValueError, match="disk_free_limit"):
            rabbitmq_conf("4.3.6", K8S, disk_free_limit=bad)


@pytest.mark.parametrize(("version", "api"), [("3.13.7", True), ("4.0.9", True), ("4.1.0", False)])
def test_kubernetes_api_only_before_the_rewritten_plugin(version: str, api: bool) -> None:
    assert needs_kubernetes_api(version) is api


def test_net_ticktime_only_when_asked() -> None:
    assert "net_ticktime" not in settings(rabbitmq_conf("4.3.6", K8S))
    assert settings(rabbitmq_conf("4.3.6", K8S, net_ticktime=10))["net_ticktime"] == "10"
