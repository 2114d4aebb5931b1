"""localcluster/partition.py: the nftables rules that cut one node off, and their cleanup."""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from localcluster import partition
from localcluster.partition import TABLE_PREFIX, LoopbackPartition, our_tables


@dataclass
class FakeCluster:
    """What LoopbackPartition reads from a LocalRabbitCluster."""

    cluster_id: str = field(default_factory=lambda: f"test{uuid.uuid4().hex[:8]}")
    size: int = 3
    dist_source_addresses: list[str] = field(
        default_factory=lambda: ["127.9.8.10", "127.9.8.11", "127.9.8.12"]
    )
    dist_ports: list[int] = field(default_factory=lambda: [40001, 40002, 40003])


def make(cluster: FakeCluster, isolated: int = 0) -> LoopbackPartition:
    return LoopbackPartition(cast(Any, cluster), isolated)


def test_rules_cut_only_the_isolated_nodes_cluster_links_on_loopback() -> None:
    rules = make(FakeCluster(), isolated=1).rules()
    lines = [ln.strip() for ln in rules.splitlines() if "reject" in ln]
    assert len(lines) == 4
    for line in lines:
        # Loopback only, never the resets themselves (they answer rejected packets).
        assert line.startswith('oifname "lo" meta l4proto tcp tcp flags & rst == 0')
    assert "ip saddr 127.9.8.11 tcp dport { 40001, 40003 }" in rules
    assert "ip daddr 127.9.8.11 tcp sport { 40001, 40003 }" in rules
    assert "ip saddr { 127.9.8.10, 127.9.8.12 } tcp dport 40002" in rules
    assert "ip daddr { 127.9.8.10, 127.9.8.12 } tcp sport 40002" in rules


def test_needs_the_clusters_own_source_addresses() -> None:
    with pytest.raises(ValueError, match="own_dist_source_addresses"):
        make(FakeCluster(dist_source_addresses=[]))


def test_not_root_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(partition.os, "geteuid", lambda: 1000)
    with pytest.raises(partition.PartitionUnavailableError, match="needs root"):
        make(FakeCluster()).cut()


def test_cut_and_heal_leave_no_table() -> None:
    if os.geteuid() != 0:
        reason = "adding nftables rules needs root"
        print(f"\nSKIP: {reason}")
        pytest.skip(reason)
    # As root, make setup installs nftables: a missing nft is a failure, not a skip.
    assert shutil.which("nft"), "nft missing: run `make setup` (apt-get install nftables)"
    cluster = FakeCluster()  # ports nobody listens on: the rules touch nothing
    table = f"{TABLE_PREFIX}{cluster.cluster_id}"
    with make(cluster) as cut:
        cut.cut()
        assert table in our_tables()
    assert table not in our_tables()
    cut.heal()  # idempotent

    # A script nft refuses (a bad address): raised, and nothing left behind.
    broken = make(FakeCluster(dist_source_addresses=["127.9.8.10", "nope", "127.9.8.12"]))
    with pytest.raises(RuntimeError, match="nft"):
        broken.cut()
    assert f"{TABLE_PREFIX}{broken.cluster.cluster_id}" not in our_tables()
