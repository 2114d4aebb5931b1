"""app.pipeline.ConfirmedPipeline against a scripted broker: the window, batched acks,
nacks, a connection lost mid-flight, a late confirm and the budget. No network: the
connection and channel are fakes that answer as RabbitMQ's confirm mode does (a
delivery tag per publish on a channel, from 1; ``basic.ack`` with ``multiple``)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from kombu.exceptions import OperationalError

from app.pipeline import ConfirmedPipeline, _Publish
from app.publish import PublishBudgetExceeded


class FakeChannel:
    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker
        self.events: defaultdict[str, set[Callable[..., None]]] = defaultdict(set)
        self.confirming = False
        self.published: list[str] = []

    def confirm_select(self) -> None:
        self.confirming = True


class FakeConnection:
    """What the pipeline uses of a kombu Connection."""

    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker
        self.alt = ["amqp://a", "amqp://b", "amqp://c"]
        self.node = 0

    def ensure_connection(self, max_retries: int) -> None:
        if self.broker.refuse_connections:
            raise OperationalError("refused")

    def channel(self) -> FakeChannel:
        channel = FakeChannel(self.broker)
        self.broker.channels.append(channel)
        return channel

    def maybe_switch_next(self) -> None:
        self.node = (self.node + 1) % len(self.alt)
        self.broker.switches += 1

    def as_uri(self) -> str:
        return self.alt[self.node]

    def drain_events(self, timeout: float) -> None:
        self.broker.on_drain(timeout)

    def release(self) -> None:
        self.broker.released = True


class FakeBroker:
    """Scripted answers: by default every drain acks everything published on the
    current channel (one ``multiple`` ack)."""

    def __init__(self) -> None:
        self.channels: list[FakeChannel] = []
        self.refuse_connections = False
        self.switches = 0
        self.released = False
        self.max_in_flight = 0
        self.now = 0.0
        self.script: list[str] = []  # per drain: "ack", "nack-first", "lose", "silent"
        self.acked: set[str] = set()
        self.lost: list[str] = []  # unacked on the channel when the connection was lost

    @property
    def channel(self) -> FakeChannel:
        return self.channels[-1]

    def publish(self, publish: _Publish, producer: Any) -> None:
        if self.refuse_connections:
            raise OperationalError("connection lost")
        self.channel.published.append(publish.task_id)

    def unacked(self, pipeline: ConfirmedPipeline) -> list[int]:
        return sorted(pipeline.outstanding)

    def on_drain(self, timeout: float) -> None:
        step = self.script.pop(0) if self.script else "ack"
        channel = self.channel
        tags = len(channel.published)
        if step == "lose":
            self.lost = [t for t in channel.published if t not in self.acked]
            raise OperationalError("connection reset")
        if step == "silent":
            self.now += timeout  # nothing comes: the drain waits its whole timeout
            raise TimeoutError("timed out")
        if step == "nack-first":
            (nack,) = channel.events["basic_nack"]
            nack(1, False)
        (ack,) = channel.events["basic_ack"]
        ack(tags, True)
        self.acked |= set(channel.published)


def make(
    broker: FakeBroker, window: int = 4, budget: float = 30.0
) -> tuple[ConfirmedPipeline, list[str]]:
    confirmed: list[str] = []
    app = SimpleNamespace(
        conf=SimpleNamespace(broker_transport_options={"confirm_publish": True}),
        connection_for_write=lambda transport_options: _connection(broker, transport_options),
        amqp=SimpleNamespace(Producer=lambda channel: SimpleNamespace(channel=channel)),
    )

    def clock() -> float:
        return broker.now

    def sleep(seconds: float) -> None:
        broker.now += seconds

    def send(publish: _Publish, producer: Any) -> None:
        broker.publish(publish, producer)

    pipeline = ConfirmedPipeline(
        app,
        window=window,
        budget=budget,
        on_confirm=confirmed.append,
        confirm_timeout=5.0,
        clock=clock,
        sleep=sleep,
        send=send,
    )
    return pipeline, confirmed


def _connection(broker: FakeBroker, options: dict[str, Any]) -> FakeConnection:
    # The pipeline puts the channel in confirm mode itself; kombu must not wait per publish.
    assert options["confirm_publish"] is False
    return FakeConnection(broker)


TASK = SimpleNamespace(name="count")


def submit_all(pipeline: ConfirmedPipeline, ids: list[str], broker: FakeBroker) -> None:
    for task_id in ids:
        pipeline.submit(TASK, task_id)
        broker.max_in_flight = max(broker.max_in_flight, len(pipeline.outstanding))
    pipeline.flush()


def test_window_bounds_what_is_in_flight_and_every_id_is_confirmed_once() -> None:
    broker = FakeBroker()
    pipeline, confirmed = make(broker, window=4)
    ids = [f"t{i}" for i in range(10)]
    submit_all(pipeline, ids, broker)
    assert confirmed == ids
    assert broker.max_in_flight == 4
    assert broker.channels[0].confirming and len(broker.channels) == 1
    assert pipeline.republished == 0 and pipeline.unconfirmed == []
    pipeline.close()
    assert broker.released


def test_a_nacked_publish_goes_again_and_is_confirmed() -> None:
    broker = FakeBroker()
    broker.script = ["nack-first"]
    pipeline, confirmed = make(broker, window=4)
    submit_all(pipeline, ["a", "b", "c", "d", "e"], broker)
    assert sorted(confirmed) == ["a", "b", "c", "d", "e"]
    assert broker.channels[0].published.count("a") == 2, "the nacked one was not published again"
    assert pipeline.republished == 1


def test_a_lost_connection_republishes_everything_unconfirmed_on_the_next_node() -> None:
    broker = FakeBroker()
    broker.script = ["ack", "lose"]
    pipeline, confirmed = make(broker, window=3)
    ids = [f"t{i}" for i in range(8)]
    submit_all(pipeline, ids, broker)
    assert sorted(confirmed) == sorted(ids) and len(confirmed) == len(ids)
    assert broker.switches == 1 and pipeline.reconnects == 1
    _, second = broker.channels
    assert broker.lost and set(broker.lost) <= set(second.published), (broker.lost, second)
    assert pipeline.republished == len(broker.lost)
    assert second.confirming


def test_a_late_confirm_is_taken_for_lost_and_published_again() -> None:
    broker = FakeBroker()
    broker.script = ["silent"]
    pipeline, confirmed = make(broker, window=2)
    submit_all(pipeline, ["x", "y", "z"], broker)
    assert sorted(confirmed) == ["x", "y", "z"]
    assert broker.switches == 1 and pipeline.republished == 2


def test_no_node_for_the_whole_budget_raises_and_names_what_was_not_confirmed() -> None:
    broker = FakeBroker()
    pipeline, confirmed = make(broker, window=4, budget=10.0)
    pipeline.submit(TASK, "ok")
    pipeline.flush()
    broker.refuse_connections = True
    broker.script = ["lose"]
    with pytest.raises(PublishBudgetExceeded) as raised:
        submit_all(pipeline, ["p", "q"], broker)
    assert confirmed == ["ok"]
    assert raised.value.elapsed >= 10.0 and raised.value.budget == 10.0
    # "p" was being published when the budget ran out; "q" was never submitted.
    assert pipeline.unconfirmed == ["p"]


def test_a_window_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="window must be at least 1, got 0"):
        make(FakeBroker(), window=0)


# ------------------------------------------------- the messages are Celery's own
def _shipped_app_on_memory() -> Any:
    """A Celery app with the shipped settings (app/settings.py), on kombu's in-memory
    transport, and a task like app.tasks.count (same name, same base class)."""
    from celery import Celery

    from app.publish import BudgetedTask
    from app.settings import WorkerSettings, celery_config

    settings = WorkerSettings.from_env({"CELERY_BROKER_URLS": "amqp://u:p@rabbit-0:5672/celery"})
    conf = celery_config(settings)
    conf["broker_url"] = "memory://"
    conf.pop("broker_transport_options")  # confirm_publish: py-amqp's, not memory's
    app = Celery("fidelity", set_as_current=False, task_cls=BudgetedTask)
    app.conf.update(conf)

    @app.task(bind=True, name="app.tasks.count")
    def count(self: Any, step_seconds: float | None = None) -> int:
        return 10

    return app, count


def _received(app: Any, queue: str, n: int) -> list[dict[str, Any]]:
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        got: list[dict[str, Any]] = []
        for _ in range(n):
            message = channel.basic_get(queue, no_ack=True)
            assert message is not None, f"only {len(got)} of {n} messages in {queue}"
            got.append(
                {
                    "headers": dict(message.headers),
                    "properties": {
                        k: v
                        for k, v in message.properties.items()
                        if k not in ("delivery_tag", "delivery_info", "body_encoding")
                    },
                    "exchange": message.delivery_info["exchange"],
                    "routing_key": message.delivery_info["routing_key"],
                    "content_type": message.content_type,
                    "content_encoding": message.content_encoding,
                    "body": message.decode(),
                }
            )
        assert channel.basic_get(queue, no_ack=True) is None, "more messages than published"
        return got


def _without_ids(message: dict[str, Any], task_id: str) -> dict[str, Any]:
    text = repr(message).replace(task_id, "<id>")
    return {"repr": text}


def test_the_pipeline_sends_the_message_apply_async_sends() -> None:
    """The same task, args and kwargs, once by ``Task.apply_async`` and twice by
    ``CeleryMessages`` (the first publish on a producer declares the queue, the next do
    not): the three messages in the queue differ by their task id only."""
    from celery import Task as CeleryTask

    from app.pipeline import CeleryMessages

    app, count = _shipped_app_on_memory()
    args, kwargs = (), {"step_seconds": 0.25}
    send = CeleryMessages()
    with app.producer_or_acquire() as producer:
        # Celery's own apply_async (BudgetedTask's adds retries around this one).
        CeleryTask.apply_async(
            count, args, kwargs, task_id="id-apply", producer=producer, retry=False
        )
        send(_Publish(count, "id-pipe-1", args, kwargs), producer)
        send(_Publish(count, "id-pipe-2", args, kwargs), producer)
    queue = app.conf.task_default_queue
    applied, piped, piped_again = _received(app, queue, 3)
    assert (
        applied["headers"]["task"] == "app.tasks.count" and applied["headers"]["id"] == "id-apply"
    )
    assert applied["body"][1] == kwargs  # protocol 2: (args, kwargs, embed)
    expected = _without_ids(applied, "id-apply")
    assert _without_ids(piped, "id-pipe-1") == expected
    assert _without_ids(piped_again, "id-pipe-2") == expected
