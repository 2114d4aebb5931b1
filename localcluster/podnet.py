"""The pod network of the twin: a Linux bridge, one network namespace per pod.

Each pod gets its own network namespace (``ip netns``), a veth pair whose host
end is a port of the run's bridge, an address in the run's own /24 and a default
route through the bridge. Pods reach each other over the bridge (layer 2, no
routing) and the host reaches every pod through the bridge's address, as a
kubelet reaches its pods. Nothing is routed off this machine: the subnet exists
only on the bridge.

Every name carries the run id (``lc<run>``), so two runs at once never collide,
and :meth:`PodNetwork.close` removes what this run made and nothing else.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# Pod subnets are /24s of this range, one per run, the first one free. It is a
# private range that only ever exists on a bridge of ours.
POD_RANGE = ipaddress.IPv4Network("10.244.0.0/16")
NETNS_DIR = Path("/run/netns")


class PodNetworkError(RuntimeError):
    pass


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise PodNetworkError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


def _subnets_in_use() -> set[ipaddress.IPv4Network]:
    out = ip("-4", "-o", "addr", "show").stdout
    used = set()
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            used.add(ipaddress.IPv4Interface(parts[parts.index("inet") + 1]).network)
    return used


def free_subnet() -> ipaddress.IPv4Network:
    used = _subnets_in_use()
    for subnet in POD_RANGE.subnets(new_prefix=24):
        if not any(subnet.overlaps(u) for u in used):
            return subnet
    raise PodNetworkError(f"no free /24 left in {POD_RANGE} for a pod network")


def _mounted(path: Path) -> bool:
    needle = f" {path} "
    with open("/proc/mounts") as mounts:
        return any(needle in line for line in mounts)


def delete_netns(name: str) -> None:
    """``ip netns del``, made reliable: the namespace file can be bind-mounted more
    than once (``ip netns add`` shares /run/netns), and one unmount leaves it busy."""
    path = NETNS_DIR / name
    for _ in range(16):
        if not _mounted(path):
            break
        subprocess.run(["umount", "--lazy", str(path)], capture_output=True, check=False)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    if path.exists():
        raise PodNetworkError(f"could not remove the network namespace {name}")


def netns_name(run_id: str, pod: str) -> str:
    return f"lc{run_id}-{pod}"


def hosts_file(entries: dict[str, list[str]], hostname: str | None = None) -> str:
    """An /etc/hosts text: ``address -> names``, plus localhost (and the pod's own name)."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    for address, names in entries.items():
        lines.append(f"{address}\t{' '.join(names)}")
    if hostname is not None and not any(hostname in names for names in entries.values()):
        lines.append(f"127.0.1.1\t{hostname}")
    return "\n".join(lines) + "\n"


@dataclass
class PodNetwork:
    """One bridge and /24 for a run; :meth:`attach` gives a pod its namespace and address."""

    run_id: str
    subnet: ipaddress.IPv4Network = field(default_factory=free_subnet)
    attached: dict[str, str] = field(default_factory=dict)  # pod -> address
    _next_host: int = 2
    _up: bool = False

    @property
    def bridge(self) -> str:
        return f"lc{self.run_id}br"

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address + 1)

    def open(self) -> None:
        if self._up:
            return
        ip("link", "add", self.bridge, "type", "bridge")
        self._up = True
        ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def address_of(self, pod: str) -> str:
        """The pod's address, allocated once and kept across its restarts (a StatefulSet's
        pod keeps its name; keeping its address too keeps the hosts files valid)."""
        if pod not in self.attached:
            address = self.subnet.network_address + self._next_host
            if address not in self.subnet or address == self.subnet.broadcast_address:
                raise PodNetworkError(f"{self.subnet} is full")
            self._next_host += 1
            self.attached[pod] = str(address)
        return self.attached[pod]

    def attach(self, pod: str) -> str:
        """Create the pod's network namespace, wired to the bridge; returns its address."""
        self.open()
        address = self.address_of(pod)
        ns = netns_name(self.run_id, pod)
        index = list(self.attached).index(pod)
        host_end, pod_end = f"lc{self.run_id}h{index}", f"lc{self.run_id}p{index}"
        ip("netns", "add", ns)
        ip("link", "add", host_end, "type", "veth", "peer", "name", pod_end)
        ip("link", "set", pod_end, "netns", ns)
        ip("link", "set", host_end, "master", self.bridge)
        ip("link", "set", host_end, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "link", "set", pod_end, "name", "eth0")
        ip("-n", ns, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "route", "add", "default", "via", self.gateway)
        return address

    def detach(self, pod: str, timeout: float = 10) -> None:
        """Remove the pod's namespace (its veth pair goes with it); the address stays reserved.

        The kernel destroys a namespace, and the veth pair in it, asynchronously (on a
        busy machine, many seconds later): the pair's host end is deleted here, which
        deletes the pair at once, so the pod can be attached again under the same names
        (a StatefulSet pod replaced right after it went)."""
        delete_netns(netns_name(self.run_id, pod))
        if pod not in self.attached:
            return
        host_end = f"lc{self.run_id}h{list(self.attached).index(pod)}"
        deadline = time.monotonic() + timeout
        while ip("link", "show", host_end, check=False).returncode == 0:
            ip("link", "del", host_end, check=False)
            if time.monotonic() > deadline:
                raise PodNetworkError(f"{host_end} still exists {timeout:.0f} s after {pod} left")
            time.sleep(0.05)

    def namespaces(self) -> list[str]:
        """This run's network namespaces that still exist."""
        prefix = f"lc{self.run_id}-"
        if not NETNS_DIR.is_dir():
            return []
        return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))

    def close(self) -> None:
        for ns in self.namespaces():
            delete_netns(ns)
        if ip("link", "show", self.bridge, check=False).returncode == 0:
            ip("link", "del", self.bridge, check=False)
        self._up = False
