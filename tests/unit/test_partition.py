"""localcluster/partition.py: the rules that cut a pod off from its peers, on real
network namespaces (two pods on a bridge of their own; no RabbitMQ, ~1 s). Needs root,
as ``make test`` is run."""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from localcluster import podnet
from localcluster.partition import TABLE, partition, rules, silence, tables

PORT = 7777
SERVE = (
    "import socket, sys\n"
    f"s = socket.create_server(('0.0.0.0', {PORT}))\n"
    "print('ready', flush=True)\n"
    "while True:\n"
    "    c, _ = s.accept(); c.close()\n"
)
CONNECT = (
    "import socket, sys\n"
    "try:\n"
    "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()\n"
    "except OSError as e:\n"
    "    print(type(e).__name__); sys.exit(1)\n"
)


def test_the_rules_cut_tcp_to_and_from_the_peers_only() -> None:
    script = rules(["10.244.7.3", "10.244.7.4"])
    assert f"table inet {TABLE}" in script
    cut = [line.strip() for line in script.splitlines() if "reject" in line]
    # Both ways, TCP only, and never the resets themselves (they carry the news).
    assert cut == [
        "meta l4proto tcp tcp flags & rst == 0 ip saddr { 10.244.7.3, 10.244.7.4 } "
        "counter reject with tcp reset",
        "meta l4proto tcp tcp flags & rst == 0 ip daddr { 10.244.7.3, 10.244.7.4 } "
        "counter reject with tcp reset",
    ]
    with pytest.raises(ValueError, match="at least one peer"):
        rules([])
    with pytest.raises(ValueError, match="'rabbitmq-server-1' is not an IPv4 address"):
        rules(["rabbitmq-server-1"])


@pytest.fixture
def two_pods() -> Iterator[tuple[podnet.PodNetwork, str, str]]:
    network = podnet.PodNetwork(f"t{secrets.token_hex(2)}")
    try:
        network.attach("a")
        network.attach("b")
        yield (
            network,
            podnet.netns_name(network.run_id, "a"),
            podnet.netns_name(network.run_id, "b"),
        )
    finally:
        network.close()
    assert network.namespaces() == []


def _connects(netns: str, address: str, port: int = PORT) -> bool:
    done = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", CONNECT, address, str(port)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.returncode == 0


def test_a_cut_pod_reaches_its_peers_no_more_but_everyone_else_still(
    two_pods: tuple[podnet.PodNetwork, str, str],
) -> None:
    network, ns_a, ns_b = two_pods
    server = subprocess.Popen(
        ["ip", "netns", "exec", ns_b, sys.executable, "-c", SERVE],
        stdout=subprocess.PIPE,
        text=True,
    )
    host = socket.create_server((network.gateway, 0))  # "a client": the host, by the bridge
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        b = network.address_of("b")
        assert _connects(ns_a, b)
        cut = partition(ns_a, [b])
        with cut:
            cut.cut()
            assert f"inet {TABLE}" in tables(ns_a)
            began = time.monotonic()
            assert not _connects(ns_a, b)  # a -> b reset at once, not timed out
            assert time.monotonic() - began < 2.5
            assert _connects(ns_a, network.gateway, host.getsockname()[1])  # clients pass
        assert tables(ns_a) == []
        assert _connects(ns_a, b)
        cut.heal()  # idempotent

        quiet = silence(ns_a)
        with quiet:
            quiet.cut()
            # Nothing answers, nothing resets: the connection attempt times out (3 s).
            began = time.monotonic()
            assert not _connects(ns_a, b)
            assert time.monotonic() - began >= 2.9
            assert not _connects(ns_a, network.gateway, host.getsockname()[1])
        assert tables(ns_a) == []
        assert _connects(ns_a, b)
    finally:
        host.close()
        server.kill()
        server.wait()


def test_a_cut_that_fails_raises_and_leaves_nothing_active() -> None:
    gone = partition(f"lc{secrets.token_hex(3)}-no-such-pod", ["10.244.7.3"])
    with pytest.raises(RuntimeError, match="no-such-pod"):
        gone.cut()
    assert not gone.active
