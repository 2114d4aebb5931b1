"""Cut a pod's network: off from its peers (a partition), or silently off from everyone
(a machine that vanished).

The rules live in the isolated pod's own network namespace (``ip netns exec <ns>
nft``), in one table, ``inet localcluster_partition``: every TCP packet between
the pod and its peers' addresses is rejected with a TCP reset, everything else
(other addresses: the worker pods, the host's ``rabbitmqctl``) passes. So the
cluster's own links fail at once, as when a switch port between two racks goes
down, and clients still reach every node. ``reject``, not ``drop``: with ``drop``
the nodes only notice after Erlang's ``net_ticktime`` (60 s); a silent drop is the
machine-loss fault's business, not this one's.

:func:`silence_rules` is the other cut: every packet in or out of the pod dropped,
nothing answered, nothing reset (a dead NIC, a crashed VM): peers and clients find
out only through their own timeouts (Erlang's ``net_ticktime``, AMQP heartbeats).

Rules in the pod's namespace cannot outlive the pod: deleting the namespace deletes
them. :meth:`NetworkCut.heal` deletes the table (idempotent) before that.
Needs root (CAP_NET_ADMIN) and the ``nft`` command (Debian package ``nftables``).
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import subprocess
from collections.abc import Sequence
from types import TracebackType

from localcluster.podnet import NETNS_DIR

__all__ = [
    "NFT_PACKAGE",
    "TABLE",
    "NetworkCut",
    "PartitionUnavailableError",
    "check_available",
    "partition",
    "rules",
    "silence",
    "silence_rules",
]

log = logging.getLogger(__name__)

NFT_PACKAGE = "nftables"
TABLE = "localcluster_partition"


class PartitionUnavailableError(RuntimeError):
    """No ``nft``: a partition cannot be made here."""


def check_available() -> None:
    """Raise :class:`PartitionUnavailableError` saying why a partition cannot be made."""
    if shutil.which("nft") is None:
        raise PartitionUnavailableError(
            f"the partition fault needs the 'nft' command: apt-get install -y {NFT_PACKAGE}"
        )


def rules(peers: Sequence[str]) -> str:
    """The nft script that cuts TCP between this namespace and ``peers``, both ways."""
    if not peers:
        raise ValueError("a partition needs at least one peer address to cut off")
    for peer in peers:
        try:
            ipaddress.IPv4Address(peer)
        except ValueError:
            raise ValueError(f"peer address {peer!r} is not an IPv4 address") from None
    addresses = ", ".join(peers)
    # Not the resets themselves: the reset answering a rejected incoming packet leaves
    # through the output hook; rejected there, the peer would hang until net_ticktime.
    cut = "meta l4proto tcp tcp flags & rst == 0"
    act = "counter reject with tcp reset"
    return "\n".join(
        [
            f"table inet {TABLE} {{",
            "  chain in {",
            "    type filter hook input priority 0; policy accept;",
            f"    {cut} ip saddr {{ {addresses} }} {act}",
            "  }",
            "  chain out {",
            "    type filter hook output priority 0; policy accept;",
            f"    {cut} ip daddr {{ {addresses} }} {act}",
            "  }",
            "}",
            "",
        ]
    )


def silence_rules() -> str:
    """The nft script that drops every packet in and out of this namespace but loopback's."""
    return "\n".join(
        [
            f"table inet {TABLE} {{",
            "  chain in {",
            "    type filter hook input priority 0; policy accept;",
            '    iifname != "lo" counter drop',
            "  }",
            "  chain out {",
            "    type filter hook output priority 0; policy accept;",
            '    oifname != "lo" counter drop',
            "  }",
            "}",
            "",
        ]
    )


def _nft(netns: str, *args: str, script: str | None = None) -> str:
    result = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", *args],
        input=script,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"nft {' '.join(args)} in {netns} failed: {result.stderr.strip()}")
    return result.stdout


def tables(netns: str) -> list[str]:
    """The nftables tables of a network namespace (``family name``)."""
    return [
        " ".join(line.split()[1:]) for line in _nft(netns, "list", "tables").splitlines() if line
    ]


class NetworkCut:
    """``cut()`` applies ``script`` in the network namespace ``netns``; ``heal()``
    (idempotent) deletes it again."""

    def __init__(self, netns: str, script: str) -> None:
        self.netns = netns
        self.script = script
        self.active = False

    def cut(self) -> None:
        check_available()
        script = self.script
        self.active = True  # before: a half-applied script is still ours to delete
        try:
            _nft(self.netns, "-f", "-", script=script)
        except BaseException:
            self.heal()
            raise
        log.info("network of %s cut", self.netns)

    def heal(self) -> None:
        if not self.active:
            return
        if not (NETNS_DIR / self.netns).exists():  # the rules went with the namespace
            self.active = False
            return
        if f"inet {TABLE}" in tables(self.netns):
            _nft(self.netns, "delete", "table", "inet", TABLE)
        self.active = False
        log.info("network of %s healed", self.netns)

    def __enter__(self) -> NetworkCut:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.heal()


def partition(netns: str, peers: Sequence[str]) -> NetworkCut:
    """The pod whose namespace is ``netns`` cut off from ``peers`` (resets, at once)."""
    return NetworkCut(netns, rules(peers))


def silence(netns: str) -> NetworkCut:
    """The pod whose namespace is ``netns`` gone silent to everyone (drops, no answer)."""
    return NetworkCut(netns, silence_rules())
