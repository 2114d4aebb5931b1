"""localcluster/rabbitlog.py: failover events read from RabbitMQ 4.3's own log lines."""

from __future__ import annotations

from localcluster import rabbitlog

N0 = "rabbit@rabbitmq-server-0.rabbitmq-nodes.rabbitmq"
N1 = "rabbit@rabbitmq-server-1.rabbitmq-nodes.rabbitmq"
N2 = "rabbit@rabbitmq-server-2.rabbitmq-nodes.rabbitmq"

# Lines as RabbitMQ 4.3.6 wrote them in a twin run (colour codes and all).
LOG_0 = f"""\
2026-12-01 01:33:25.665934+00:00 [info] <0.1269.0> queue 'celery' in vhost 'celery': \
detected a new leader {{celery_celery,'{N1}'}} in term 1\x1b[0m
2026-12-01 01:33:37.867300+00:00 [info] <0.819.0> rabbit on node '{N1}' down\x1b[0m
2026-12-01 01:33:37.867471+00:00 [info] <0.819.0> node '{N1}' down: connection_closed\x1b[0m
2026-12-01 01:33:38.477338+00:00 [info] <0.1269.0> queue 'celery' in vhost 'celery': \
detected a new leader {{celery_celery,'{N2}'}} in term 2\x1b[0m
              {{shutdown,1000}},
"""
LOG_2 = f"""\
\x1b[38;5;87m2026-12-01 01:33:38.466113+00:00 [notice] <0.1274.0> queue 'celery' in vhost \
'celery': candidate -> leader in term: 2 machine version: 8, last applied 187\x1b[0m
2026-12-01 01:33:39.100000+00:00 [info] <0.819.0> rabbit on node '{N1}' down\x1b[0m
"""


def events() -> list[rabbitlog.Event]:
    return rabbitlog.parse(LOG_0, N0) + rabbitlog.parse(LOG_2, N2)


def test_node_down_and_leader_lines_are_read_with_their_time() -> None:
    found = rabbitlog.parse(LOG_0, N0)
    assert [type(e).__name__ for e in found] == ["NewLeader", "NodeDown", "NewLeader"]
    down = found[1]
    assert isinstance(down, rabbitlog.NodeDown)
    assert (down.seen_by, down.node) == (N0, N1)
    assert round(down.ts, 3) == 1796088817.867  # 2026-12-01 01:33:37.867300 UTC
    won = rabbitlog.parse(LOG_2, N2)[0]
    assert isinstance(won, rabbitlog.NewLeader)
    assert (won.queue, won.vhost, won.node, won.term) == ("celery", "celery", N2, 2)


def test_when_every_peer_declared_the_node_down() -> None:
    since = 1796088817.0
    down = rabbitlog.first_down(events(), N1, since)
    assert {k: round(v - since, 2) for k, v in down.items()} == {N0: 0.87, N2: 2.1}
    assert rabbitlog.first_down(events(), N1, since + 10) == {}
    assert rabbitlog.first_down(events(), N0, since) == {}


def test_the_first_leader_elsewhere_after_the_fault() -> None:
    since = 1796088817.0
    leader = rabbitlog.first_new_leader(events(), "celery", since, other_than=N1)
    assert leader is not None and leader.node == N2 and leader.term == 2
    assert round(leader.ts - since, 2) == 1.47  # the winner's own line, before its peer's
    assert rabbitlog.first_new_leader(events(), "other", since, other_than=N1) is None


# Memory alarm lines as RabbitMQ 4.3.6 wrote them in a twin run (each node logs every
# node's alarm; the cluster-wide "cleared across the cluster" line is not an alarm).
ALARM_0 = f"""\
\x1b[38;5;214m2026-12-01 04:56:28.436628+00:00 [warning] <0.803.0> memory resource limit alarm \
set on node '{N0}'.\x1b[0m
\x1b[38;5;214m2026-12-01 04:56:28.500000+00:00 [warning] <0.803.0> memory resource limit alarm \
set on node '{N2}'.\x1b[0m
\x1b[38;5;214m2026-12-01 04:57:11.484847+00:00 [warning] <0.803.0> memory resource limit alarm \
cleared on node '{N2}'\x1b[0m
\x1b[38;5;214m2026-12-01 04:57:12.237541+00:00 [warning] <0.803.0> memory resource limit alarm \
cleared on node '{N0}'\x1b[0m
\x1b[38;5;214m2026-12-01 04:57:12.480116+00:00 [warning] <0.803.0> memory resource limit alarm \
cleared across the cluster\x1b[0m
"""
ALARM_2 = f"""\
\x1b[38;5;214m2026-12-01 04:56:28.426237+00:00 [warning] <0.862.0> memory resource limit alarm \
set on node '{N2}'.\x1b[0m
\x1b[38;5;214m2026-12-01 04:56:29.000000+00:00 [warning] <0.862.0> memory resource limit alarm \
set on node '{N0}'.\x1b[0m
\x1b[38;5;214m2026-12-01 04:57:11.484000+00:00 [warning] <0.862.0> memory resource limit alarm \
cleared on node '{N2}'\x1b[0m
"""


def test_memory_alarms_raised_and_cleared_as_each_node_logged_its_own() -> None:
    found = rabbitlog.parse(ALARM_0, N0) + rabbitlog.parse(ALARM_2, N2)
    alarms = [e for e in found if isinstance(e, rabbitlog.MemoryAlarm)]
    assert len(alarms) == 7
    assert {(e.node, e.raised) for e in alarms if e.seen_by == N0} == {
        (N0, True),
        (N2, True),
        (N2, False),
        (N0, False),
    }
    raised, cleared = rabbitlog.memory_alarms(found, since=0)
    # The first alarm is node 2's own (04:56:28.426); all cleared once node 0's own did.
    assert raised == rabbitlog._ts("2026-12-01 04:56:28.426237+00:00")
    assert cleared == rabbitlog._ts("2026-12-01 04:57:12.237541+00:00")
    # Node 0 never logging its own clear: an alarm still raised, so no clear time.
    still = rabbitlog.parse(ALARM_0.split("\n")[0], N0) + rabbitlog.parse(ALARM_2, N2)
    assert rabbitlog.memory_alarms(still, since=0)[1] is None
    # Nothing raised after ``since``: neither.
    assert rabbitlog.memory_alarms(found, since=raised + 3600) == (None, None)
