"""Cut one RabbitMQ node of a :class:`LocalRabbitCluster` off from the others.

A network partition on one machine, with nftables rules on the loopback
interface.  The cluster must be started with ``own_dist_source_addresses=True``:
node i then opens its Erlang distribution connections from its own loopback
address (127.A.B.10+i), while every node listens on 127.0.0.1 on its own port.
The rules reject (TCP reset) every packet between the isolated node and its
peers' distribution traffic, in both directions:

* from the isolated node's address to a peer's distribution port (and back),
* from a peer's address to the isolated node's distribution port (and back).

Clients (AMQP, ``rabbitmqctl`` from 127.0.0.1) are not touched: only the
cluster's own links are cut.  ``reject with tcp reset`` rather than ``drop``: the
connections fail at once, as when a switch port goes down; with ``drop`` the
nodes would only notice after the Erlang ``net_ticktime`` (60 s, 45-75 s).

Everything lives in one nftables table of our own, ``inet localcluster_<cluster
id>``: :meth:`LoopbackPartition.heal` deletes it (idempotent), and nothing else
is touched.  Needs root (CAP_NET_ADMIN) and the ``nft`` command (Debian package
``nftables``).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from types import TracebackType

from localcluster.rabbit import LocalRabbitCluster

__all__ = [
    "NFT_PACKAGE",
    "TABLE_PREFIX",
    "LoopbackPartition",
    "PartitionUnavailableError",
    "check_available",
    "our_tables",
]

log = logging.getLogger(__name__)

NFT_PACKAGE = "nftables"
TABLE_PREFIX = "localcluster_"


class PartitionUnavailableError(RuntimeError):
    """Not root, or no ``nft``: a partition cannot be made here."""


def check_available() -> None:
    """Raise :class:`PartitionUnavailableError` saying why a partition cannot be made."""
    if os.geteuid() != 0:
        raise PartitionUnavailableError(
            "the partition fault needs root: it adds nftables rules on the loopback "
            "interface to cut one RabbitMQ node off (run as root, or pick another --fault)"
        )
    if shutil.which("nft") is None:
        raise PartitionUnavailableError(
            f"the partition fault needs the 'nft' command: apt-get install -y {NFT_PACKAGE}"
        )


def _nft(*args: str, script: str | None = None) -> str:
    result = subprocess.run(
        ["nft", *args], input=script, capture_output=True, text=True, timeout=30, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"nft {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def our_tables() -> list[str]:
    """Names of the nftables tables made by :class:`LoopbackPartition` still present."""
    if os.geteuid() != 0 or shutil.which("nft") is None:
        return []
    names = []
    for line in _nft("list", "tables").splitlines():
        parts = line.split()  # "table inet localcluster_xxx"
        if len(parts) == 3 and parts[2].startswith(TABLE_PREFIX):
            names.append(parts[2])
    return names


class LoopbackPartition:
    """``cut()`` node ``isolated`` off from its peers; ``heal()`` (idempotent) undoes it."""

    def __init__(self, cluster: LocalRabbitCluster, isolated: int) -> None:
        if not cluster.dist_source_addresses:
            raise ValueError("the cluster needs own_dist_source_addresses=True")
        self.cluster = cluster
        self.isolated = isolated
        self.table = f"{TABLE_PREFIX}{cluster.cluster_id}"
        self.active = False

    def rules(self) -> str:
        """The nft script that creates our table (loopback only, our ports only)."""
        addrs = self.cluster.dist_source_addresses
        ports = self.cluster.dist_ports
        me, my_port = addrs[self.isolated], ports[self.isolated]
        peers = [i for i in range(self.cluster.size) if i != self.isolated]
        peer_addrs = ", ".join(addrs[i] for i in peers)
        peer_ports = ", ".join(str(ports[i]) for i in peers)
        # Not the resets themselves: the reset answering a rejected packet goes back
        # through this hook and matches the reverse rule; dropped, the connection
        # would hang until net_ticktime instead of failing at once.
        cut = 'oifname "lo" meta l4proto tcp tcp flags & rst == 0'
        act = "counter reject with tcp reset"
        return "\n".join(
            [
                f"table inet {self.table} {{",
                "  chain out {",
                "    type filter hook output priority 0; policy accept;",
                f"    {cut} ip saddr {me} tcp dport {{ {peer_ports} }} {act}",
                f"    {cut} ip daddr {me} tcp sport {{ {peer_ports} }} {act}",
                f"    {cut} ip saddr {{ {peer_addrs} }} tcp dport {my_port} {act}",
                f"    {cut} ip daddr {{ {peer_addrs} }} tcp sport {my_port} {act}",
                "  }",
                "}",
                "",
            ]
        )

    def cut(self) -> None:
        check_available()
        self.active = True  # before: a half-applied script is still ours to delete
        try:
            _nft("-f", "-", script=self.rules())
        except BaseException:
            self.heal()
            raise
        log.info("partition: %s cut off (nft table inet %s)", self.isolated, self.table)

    def heal(self) -> None:
        if not self.active:
            return
        if self.table in our_tables():
            _nft("delete", "table", "inet", self.table)
        self.active = False
        log.info("partition healed (nft table inet %s deleted)", self.table)

    def __enter__(self) -> LoopbackPartition:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.heal()
