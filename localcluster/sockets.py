"""Which TCP peers a process is connected to, read from /proc (no tools needed).

Works for a process in another network namespace too: ``/proc/<pid>/net/tcp``
is the table of the namespace the process is in.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections import Counter
from pathlib import Path


def _endpoint(field: str) -> tuple[str, int]:
    """``0100007F:1628`` (little-endian IPv4, hex port) or the IPv6 form -> (ip, port)."""
    address, port = field.rsplit(":", 1)
    raw = bytes.fromhex(address)
    if len(raw) == 4:
        ip = str(ipaddress.IPv4Address(raw[::-1]))
    else:
        # /proc prints IPv6 as four little-endian 32-bit words.
        words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
        v6 = ipaddress.IPv6Address(words)
        ip = str(v6.ipv4_mapped or v6)
    return ip, int(port, 16)


def established_endpoints(pid: int) -> Counter[tuple[str, int]]:
    """(remote ip, remote port) of every ESTABLISHED TCP socket ``pid`` holds."""
    inodes: set[str] = set()
    try:
        for fd in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(fd.path)
                if link.startswith("socket:["):
                    inodes.add(link[len("socket:[") : -1])
    except OSError:
        return Counter()
    found: Counter[tuple[str, int]] = Counter()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != "01" or fields[9] not in inodes:
                continue  # 01: ESTABLISHED
            found[_endpoint(fields[2])] += 1
    return found
