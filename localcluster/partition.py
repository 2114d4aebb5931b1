"""Cut one pod off from its peers on the pod network: a network partition of the twin.

The rules live in the isolated pod's own network namespace (``ip netns exec <ns>
nft``), in one table, ``inet localcluster_partition``: every TCP packet between
the pod and its peers' addresses is rejected with a TCP reset, everything else
(other addresses: the worker pods, the host's ``rabbitmqctl``) passes. So the
cluster's own links fail at once, as when a switch port between two racks goes
down, and clients still reach every node. ``reject``, not ``drop``: with ``drop``
the nodes only notice after Erlang's ``net_ticktime`` (60 s); a silent drop is the
machine-loss fault's business, not this one's.

Rules in the pod's namespace cannot outlive the pod: deleting the namespace deletes
them. :meth:`PodPartition.heal` deletes the table (idempotent) before that.
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

__all__ = ["NFT_PACKAGE", "TABLE", "PartitionUnavailableError", "PodPartition", "check_available"]

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


class PodPartition:
    """``cut()`` the pod whose network namespace is ``netns`` off from ``peers``;
    ``heal()`` (idempotent) undoes it."""

    def __init__(self, netns: str, peers: Sequence[str]) -> None:
        self.netns = netns
        self.peers = list(peers)
        self.active = False

    def rules(self) -> str:
        return rules(self.peers)

    def cut(self) -> None:
        check_available()
        script = self.rules()
        self.active = True  # before: a half-applied script is still ours to delete
        try:
            _nft(self.netns, "-f", "-", script=script)
        except BaseException:
            self.heal()
            raise
        log.info("partition: %s cut off from %s", self.netns, self.peers)

    def heal(self) -> None:
        if not self.active:
            return
        if not (NETNS_DIR / self.netns).exists():  # the rules went with the namespace
            self.active = False
            return
        if f"inet {TABLE}" in tables(self.netns):
            _nft(self.netns, "delete", "table", "inet", TABLE)
        self.active = False
        log.info("partition of %s healed", self.netns)

    def __enter__(self) -> PodPartition:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.heal()
