"""What a RabbitMQ node's log says about a failover, with the time it said it.

RabbitMQ 4.x logs, one line per event, with a wall-clock timestamp:

* ``rabbit on node 'rabbit@X' down``: this node declared X down (for a silent
  machine, after Erlang's ``net_ticktime``; for a reset connection, at once);
* ``memory resource limit alarm set on node 'rabbit@X'`` / ``... cleared on node
  'rabbit@X'``: X's memory alarm (every node logs every node's), which blocks the
  cluster's publishers while it lasts;
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

MEMORY_ALARM = re.compile(
    r"^memory resource limit alarm (?P<what>set|cleared) on node '(?P<node>[^']+)'"
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


@dataclass(frozen=True)
class MemoryAlarm:
    ts: float
    seen_by: str
    node: str
    raised: bool


Event = NodeDown | NewLeader | MemoryAlarm


def _ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace(" ", "T")).timestamp()


def parse(text: str, node: str) -> list[Event]:
    """The failover and alarm events in ``node``'s log ``text``, in log order."""
    events: list[Event] = []
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
        elif alarm := MEMORY_ALARM.match(msg):
            events.append(MemoryAlarm(ts, node, alarm["node"], alarm["what"] == "set"))
    return events


def first_down(events: Iterable[Event], node: str, since: float) -> dict[str, float]:
    """When each peer first declared ``node`` down at or after ``since``: peer -> time."""
    seen: dict[str, float] = {}
    for e in events:
        if isinstance(e, NodeDown) and e.node == node and e.ts >= since:
            seen[e.seen_by] = min(seen.get(e.seen_by, e.ts), e.ts)
    return seen


def first_new_leader(
    events: Iterable[Event], queue: str, since: float, other_than: str
) -> NewLeader | None:
    """The first leader of ``queue`` on a node other than ``other_than`` at or after ``since``."""
    found = [
        e
        for e in events
        if isinstance(e, NewLeader) and e.queue == queue and e.ts >= since and e.node != other_than
    ]
    return min(found, key=lambda e: e.ts) if found else None


def memory_alarms(events: Iterable[Event], since: float) -> tuple[float | None, float | None]:
    """When the first memory alarm was raised at or after ``since``, and when the last of
    the alarms raised was cleared (None: never raised, or some alarm not cleared). Each
    node's alarm as that node logged it (every node logs every node's: counted once)."""
    alarms = sorted(
        (e for e in events if isinstance(e, MemoryAlarm) and e.ts >= since and e.seen_by == e.node),
        key=lambda e: e.ts,
    )
    if not any(e.raised for e in alarms):
        return None, None
    active: set[str] = set()
    cleared: float | None = None
    for e in alarms:
        if e.raised:
            active.add(e.node)
        else:
            active.discard(e.node)
        cleared = None if active else e.ts
    first = next(e.ts for e in alarms if e.raised)
    return first, cleared
