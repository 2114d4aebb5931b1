"""``python -m localcluster.flood``: publish large messages until RabbitMQ's memory
alarm blocks the publishers, then drain them; count every confirmed one.

The ``memory-pressure`` fault (:mod:`localcluster.faults`) runs this as a pod of the
worker Deployment's template (its broker URLs, its network), so what fills the
RabbitMQ pods' memory is the pod network's traffic, under the pods' memory limits
as shipped.

1. ``--connections`` publisher connections (one per broker URL in turn), each with
   publisher confirms and up to ``--window`` unconfirmed ``--message-mib`` messages
   in flight, publish to the quorum queue ``--queue`` (which has no consumer yet);
   RabbitMQ's credit flow bounds messages, not bytes, so large messages pile up in
   the brokers' memory until the memory alarm fires and RabbitMQ blocks every
   publishing connection (``connection.blocked``);
2. publishing stops at the first ``connection.blocked`` (or once ``--max-mib`` were
   published without one: the alarm never fired), and the alarm is held for
   ``--hold-seconds``;
3. a consumer on its own connection (consumers are never blocked) drains the queue,
   acknowledging each message; the alarm clears, the publishers are unblocked and
   their outstanding confirms arrive;
4. once every publisher has settled (each message confirmed, nacked or its connection
   gone) and the queue is empty, the queue is deleted and ``--result`` written: which
   messages were confirmed, which consumed, and the confirmed ones never consumed
   (lost: must be none).

Events (``blocked``, ``unblocked``, ``draining``, ``drained``) are appended to
``--events`` as they happen (JSON lines, wall-clock ``ts``), so the fault can follow.
py-amqp's default ``TCP_USER_TIMEOUT`` (1 s) would abort a blocked publisher's
connection within a second of RabbitMQ no longer reading its socket (seen here: the
flood's connections reset by their own kernel); a blocked publisher is supposed to
wait, so these connections allow a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import amqp
from kombu.utils.url import url_to_parts

from app.settings import ENV_BROKER_URLS

MIB = 1024 * 1024
#: A blocked publisher waits; its unacknowledged bytes must not abort the connection.
BLOCKED_TCP_USER_TIMEOUT_MS = 60_000
CONNECT_TIMEOUT = 10.0


@dataclass
class Publisher:
    """One publishing connection and what became of its messages."""

    index: int
    url: str
    outstanding: dict[int, str] = field(default_factory=dict)
    confirmed: list[str] = field(default_factory=list)
    nacked: list[str] = field(default_factory=list)
    published: int = 0
    blocked_at: float | None = None
    unblocked_at: float | None = None
    error: str | None = None
    done: bool = False


def connect(url: str, **kwargs: Any) -> amqp.Connection:
    parts = url_to_parts(url)
    connection = amqp.Connection(
        host=f"{parts.hostname}:{parts.port or 5672}",
        userid=parts.username,
        password=parts.password,
        virtual_host=parts.path or "/",
        connect_timeout=CONNECT_TIMEOUT,
        heartbeat=0,
        socket_settings={socket.TCP_USER_TIMEOUT: BLOCKED_TCP_USER_TIMEOUT_MS},
        **kwargs,
    )
    connection.connect()
    return connection


class Flood:
    def __init__(self, args: argparse.Namespace, urls: Sequence[str]) -> None:
        self.args = args
        self.urls = list(urls)
        self.body = os.urandom(int(args.message_mib * MIB))
        self.stop_publishing = threading.Event()
        self.give_up = threading.Event()
        self.publishers = [
            Publisher(k, self.urls[k % len(self.urls)]) for k in range(args.connections)
        ]
        self.lock = threading.Lock()
        self.published_bytes = 0
        self.events_file = args.events.open("a", encoding="utf-8")

    def event(self, name: str, **fields: Any) -> float:
        now = time.time()
        with self.lock:
            self.events_file.write(json.dumps({"event": name, "ts": now, **fields}) + "\n")
            self.events_file.flush()
        return now

    # -------------------------------------------------------------- publishing
    def publish(self, pub: Publisher) -> None:
        try:
            connection = connect(
                pub.url,
                on_blocked=lambda reason: self._blocked(pub, reason),
                on_unblocked=lambda: self._unblocked(pub),
            )
        except Exception as exc:
            pub.error, pub.done = f"connect: {exc!r}", True
            return
        try:
            channel = connection.channel()
            channel.confirm_select()
            channel.events["basic_ack"].add(lambda tag, multiple: self._settle(pub, tag, multiple))
            channel.events["basic_nack"].add(
                lambda tag, multiple, *_: self._settle(pub, tag, multiple, nacked=True)
            )
            tag = 0
            while not self.give_up.is_set():
                if not self.stop_publishing.is_set() and len(pub.outstanding) < self.args.window:
                    tag += 1
                    message_id = f"{pub.index}-{tag}"
                    pub.outstanding[tag] = message_id
                    channel.basic_publish(
                        amqp.Message(self.body, delivery_mode=2, message_id=message_id),
                        exchange="",
                        routing_key=self.args.queue,
                    )
                    pub.published += 1
                    if self._count(len(self.body)) >= self.args.max_mib * MIB:
                        self.event("cap", mib=self.args.max_mib)
                        self.stop_publishing.set()
                    continue
                if self.stop_publishing.is_set() and not pub.outstanding:
                    break
                with contextlib.suppress(TimeoutError):
                    connection.drain_events(timeout=0.5)
        except Exception as exc:  # the connection is gone: its outstanding ones are unknown
            pub.error = repr(exc)
        finally:
            pub.done = True
            try:
                connection.close()
            except Exception:
                connection.collect()

    def _count(self, size: int) -> int:
        with self.lock:
            self.published_bytes += size
            return self.published_bytes

    def _settle(self, pub: Publisher, tag: int, multiple: bool, nacked: bool = False) -> None:
        tags = [t for t in pub.outstanding if t <= tag] if multiple else [tag]
        for t in tags:
            message_id = pub.outstanding.pop(t, None)
            if message_id is not None:
                (pub.nacked if nacked else pub.confirmed).append(message_id)

    def _blocked(self, pub: Publisher, reason: str) -> None:
        if pub.blocked_at is None:
            pub.blocked_at = self.event("blocked", connection=pub.index, reason=reason)
        self.stop_publishing.set()

    def _unblocked(self, pub: Publisher) -> None:
        pub.unblocked_at = self.event("unblocked", connection=pub.index)

    # ---------------------------------------------------------------- draining
    def drain(self, deadline: float) -> tuple[list[str], float | None]:
        """Consume the queue until every publisher settled and the queue is empty."""
        consumed: list[str] = []
        connection = connect(self.urls[-1])
        try:
            channel = connection.channel()
            channel.basic_qos(0, 8, False)  # 64 MiB in flight: the pod has 512Mi

            def on_message(message: amqp.Message) -> None:
                consumed.append(str(message.properties.get("message_id")))
                channel.basic_ack(message.delivery_tag)

            tag = channel.basic_consume(self.args.queue, callback=on_message)
            idle_since = time.monotonic()
            while time.time() < deadline:
                before = len(consumed)
                with contextlib.suppress(TimeoutError):
                    connection.drain_events(timeout=0.5)
                if len(consumed) != before:
                    idle_since = time.monotonic()
                settled = all(p.done for p in self.publishers)
                if settled and time.monotonic() - idle_since > 1.0:
                    _, ready, _ = channel.queue_declare(self.args.queue, passive=True)
                    if ready == 0:
                        break
            drained = time.time()
            channel.basic_cancel(tag)  # before the delete: else RabbitMQ cancels it
            channel.queue_delete(self.args.queue)
            return consumed, drained
        finally:
            try:
                connection.close()
            except Exception:  # what it consumed is counted; the connection's end is not
                connection.collect()

    # ------------------------------------------------------------------- whole
    def run(self) -> dict[str, Any]:
        args = self.args
        declare = connect(self.urls[0])
        try:
            declare.channel().queue_declare(
                args.queue, durable=True, auto_delete=False, arguments={"x-queue-type": "quorum"}
            )
        finally:
            declare.close()
        started = self.event("publishing", connections=args.connections, mib=args.message_mib)
        threads = [
            threading.Thread(target=self.publish, args=(p,), daemon=True) for p in self.publishers
        ]
        for thread in threads:
            thread.start()
        deadline = started + args.timeout
        while not self.stop_publishing.is_set() and not all(p.done for p in self.publishers):
            if time.time() > deadline:
                break
            time.sleep(0.1)
        self.stop_publishing.set()
        stopped = self.event("stopped", mib=round(self.published_bytes / MIB, 1))
        time.sleep(args.hold_seconds)
        self.event("draining")
        consumed, drained = self.drain(deadline)
        self.event("drained", consumed=len(consumed))
        self.give_up.set()
        for thread in threads:
            thread.join(timeout=10)
        confirmed = [m for p in self.publishers for m in p.confirmed]
        consumed_set = set(consumed)
        lost = sorted(m for m in confirmed if m not in consumed_set)
        blocked = [p.blocked_at for p in self.publishers if p.blocked_at is not None]
        unblocked = [p.unblocked_at for p in self.publishers if p.unblocked_at is not None]
        return {
            "started": started,
            "stopped": stopped,
            "blocked": min(blocked) if blocked else None,
            "unblocked": max(unblocked) if unblocked else None,
            "drained": drained,
            "message_mib": args.message_mib,
            "published": sum(p.published for p in self.publishers),
            "published_mib": round(self.published_bytes / MIB, 1),
            "confirmed": len(confirmed),
            "nacked": sum(len(p.nacked) for p in self.publishers),
            "unsettled": sum(len(p.outstanding) for p in self.publishers),
            "consumed": len(consumed),
            "consumed_twice": len(consumed) - len(consumed_set),
            "confirmed_lost": len(lost),
            "confirmed_lost_ids": lost[:20],
            "connections_blocked": len(blocked),
            "errors": [p.error for p in self.publishers if p.error],
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m localcluster.flood")
    parser.add_argument("--queue", required=True)
    parser.add_argument("--message-mib", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--window", type=int, default=16, help="unconfirmed messages each")
    parser.add_argument("--max-mib", type=float, default=16384.0, help="stop without an alarm")
    parser.add_argument("--hold-seconds", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--events", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    urls = [u for u in os.environ.get(ENV_BROKER_URLS, "").split(",") if u]
    if not urls:
        print(f"error: {ENV_BROKER_URLS} is empty", file=sys.stderr)
        return 2
    result = Flood(args, urls).run()
    args.result.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "confirmed_lost_ids"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
