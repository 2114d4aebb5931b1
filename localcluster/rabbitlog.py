"""What a RabbitMQ node's log says about a failover, with the time it said it.

RabbitMQ 4.x logs, one line per event, with a wall-clock timestamp:

* ``rabbit on node 'rabbit@X' down``: this node declared X down (for a silent
  machine, after Erlang's ``net_ticktime``; for a reset connection, at once);
* ``queue 'Q' in vhost 'V': detected a new leader {Ra id,'rabbit@Y'} in term N``
  (a follower learnt of a leader) and ``queue 'Q' in vhost 'V': candidate -> leader
  in term: N`` (this node won the election).

Pure functions over the log's text: a run reads its pods' logs after the fault.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass

ANSI = re.compile(r"\x1b\[[0-9;]*m")
LINE = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+[+-]\d\d:\d\d) \[\w+\] <[\d.]+> (?P<msg>.*)$"
)
NODE_DOWN = re.compile(r"^rabbit on node '(?P<node>[^']+)' down")
NEW_LEADER = re.compile(
    r"^queue '(?P<queue>[^']+)' in vhost '(?P<vhost>[^']+)': detected a new leader "
    r"\{[^,]+,'?(?P<node>[^'}]+)'?\} in term (?P<term>\d+)"
)
BECAME_LEADER = re.compile(
    r"^queue '(?P<queue>[^']+)' in vhost '(?P<vhost>[^']+)': candidate -> leader in term: "
    r"(?P<term>\d+)"
)


@dataclass(frozen=True)
class NodeDown:
    ts: float
    seen_by: str
    node: str


@dataclass(frozen=True)
class NewLeader:
    ts: float
    seen_by: str
    queue: str
    vhost: str
    node: str
    term: int


def _ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace(" ", "T")).timestamp()


def parse(text: str, node: str) -> list[NodeDown | NewLeader]:
    """The failover events in ``node``'s log ``text``, in log order."""
    events: list[NodeDown | NewLeader] = []
    for raw in text.splitlines():
        line = LINE.match(ANSI.sub("", raw).rstrip())
        if line is None:
            continue
        msg, ts = line["msg"], _ts(line["ts"])
        if down := NODE_DOWN.match(msg):
            events.append(NodeDown(ts, node, down["node"]))
        elif new := NEW_LEADER.match(msg):
            events.append(
                NewLeader(ts, node, new["queue"], new["vhost"], new["node"], int(new["term"]))
            )
        elif won := BECAME_LEADER.match(msg):
            events.append(NewLeader(ts, node, won["queue"], won["vhost"], node, int(won["term"])))
    return events


def first_down(events: Iterable[NodeDown | NewLeader], node: str, since: float) -> dict[str, float]:
    """When each peer first declared ``node`` down at or after ``since``: peer -> time."""
    seen: dict[str, float] = {}
    for e in events:
        if isinstance(e, NodeDown) and e.node == node and e.ts >= since:
            seen[e.seen_by] = min(seen.get(e.seen_by, e.ts), e.ts)
    return seen


def first_new_leader(
    events: Iterable[NodeDown | NewLeader], queue: str, since: float, other_than: str
) -> NewLeader | None:
    """The first leader of ``queue`` on a node other than ``other_than`` at or after ``since``."""
    found = [
        e
        for e in events
        if isinstance(e, NewLeader) and e.queue == queue and e.ts >= since and e.node != other_than
    ]
    return min(found, key=lambda e: e.ts) if found else None
