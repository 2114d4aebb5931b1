"""Unit tests for app.settings (Celery settings from the environment) and app.ledger."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from app import ledger
from app.settings import (
    DEFAULT_PUBLISH_RETRY_SECONDS,
    WorkerSettings,
    celery_config,
    stable_rotation,
)

URLS = [
    "amqp://user:s3cret@rmq-0.rmq.celery.svc:5672/vhost",
    "amqp://user:s3cret@rmq-1.rmq.celery.svc:5672/vhost",
    "amqp://user:s3cret@rmq-2.rmq.celery.svc:5672/vhost",
]


def env(**extra: str) -> dict[str, str]:
    base = {"CELERY_BROKER_URLS": ",".join(URLS), "HOSTNAME": "counter-abc-123"}
    base.update(extra)
    return base


def config(**extra: str) -> dict[str, Any]:
    return celery_config(WorkerSettings.from_env(env(**extra)))


# --- the settings that decide whether tasks are lost ---------------------------


def test_no_loss_settings() -> None:
    conf = config()
    assert conf["task_acks_late"] is True
    assert conf["task_reject_on_worker_lost"] is True
    assert conf["task_acks_on_failure_or_timeout"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["broker_transport_options"]["confirm_publish"] is True
    assert conf["broker_connection_retry_on_startup"] is True
    assert conf["broker_connection_retry"] is True
    assert conf["broker_connection_max_retries"] is None
    assert conf["broker_heartbeat"] == 3
    assert conf["broker_channel_error_retry"] is True
    assert conf["worker_detect_quorum_queues"] is True
    # No pidbox queue to be locked on a lost node (see celery_config).
    assert conf["worker_enable_remote_control"] is False
    on = celery_config(WorkerSettings.from_env(env(CELERY_REMOTE_CONTROL="1")))
    assert on["worker_enable_remote_control"] is True


def test_quorum_queue_on_topic_exchange() -> None:
    conf = config(CELERY_QUEUE="work")
    assert conf["task_default_queue_type"] == "quorum"
    assert conf["task_default_exchange_type"] == "topic"
    assert conf["task_create_missing_queue_type"] == "quorum"
    assert conf["task_create_missing_queue_exchange_type"] == "topic"
    assert conf["broker_native_delayed_delivery_queue_type"] == "quorum"
    assert conf["task_default_queue"] == "work"
    (queue,) = conf["task_queues"]
    assert queue.name == "work"
    assert queue.queue_arguments == {"x-queue-type": "quorum"}
    assert queue.exchange.name == "work"
    assert queue.exchange.type == "topic"
    assert queue.routing_key == "work"
    assert queue.durable is True


def test_publish_retry_outlasts_a_failover() -> None:
    conf = config()
    assert conf["task_publish_retry"] is True
    # kombu's own retry: a single attempt (its connection step would otherwise
    # stop after broker_connection_timeout in total, whatever max_retries says);
    # app.publish retries around it for the budget.
    assert conf["task_publish_retry_policy"]["max_retries"] == 0
    assert WorkerSettings.from_env(env()).publish_retry_seconds == DEFAULT_PUBLISH_RETRY_SECONDS
    assert 60 <= DEFAULT_PUBLISH_RETRY_SECONDS <= 180, "outlast a restart, still fail"
    budget = WorkerSettings.from_env(env(CELERY_PUBLISH_RETRY_SECONDS="12.5"))
    assert budget.publish_retry_seconds == 12.5


def test_pool_defaults_and_overrides() -> None:
    conf = config()
    assert conf["worker_pool"] == "threads"
    assert conf["worker_concurrency"] == 100
    assert conf["worker_cancel_long_running_tasks_on_connection_loss"] is False
    conf = config(CELERY_POOL="prefork")
    assert conf["worker_pool"] == "prefork"
    assert conf["worker_concurrency"] == (os.cpu_count() or 1)
    assert conf["worker_cancel_long_running_tasks_on_connection_loss"] is True
    conf = config(CELERY_POOL="Threads", CELERY_CONCURRENCY="7")
    assert (conf["worker_pool"], conf["worker_concurrency"]) == ("threads", 7)
    assert config(CELERY_POOL="solo")["worker_concurrency"] == 1
    assert config(CELERY_BROKER_HEARTBEAT="0")["broker_heartbeat"] == 0


def test_config_is_pure() -> None:
    s = WorkerSettings.from_env(env())
    assert celery_config(s) == celery_config(s)
    assert celery_config(s) is not celery_config(s)


def test_celery_accepts_every_key() -> None:
    """Every key is a real Celery 5.7 setting (a typo would be silently ignored)."""
    from celery.app.defaults import flatten

    known = {name for name, _ in flatten(__import__("celery.app.defaults").app.defaults.NAMESPACES)}
    unknown = set(config()) - known
    assert not unknown, f"not Celery settings: {sorted(unknown)}"


def test_app_boots_from_the_same_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from celery import Celery

    conf = config(CELERY_QUEUE="boot")
    app = Celery("boot-test")
    app.conf.update(conf)
    assert app.conf.task_acks_late is True
    assert app.conf.broker_url == conf["broker_url"]
    assert app.amqp.queues["boot"].queue_arguments == {"x-queue-type": "quorum"}
    # The publish path picks our topic exchange and routing key.
    assert app.amqp.default_queue.exchange.type == "topic"


# --- rotation --------------------------------------------------------------------


def test_rotation_explicit_gives_distinct_first_urls() -> None:
    firsts = []
    for i in range(3):
        urls = config(CELERY_BROKER_ROTATION=str(i))["broker_url"]
        assert sorted(urls) == sorted(URLS), "every node stays in every failover list"
        assert len(urls) == len(URLS)
        firsts.append(urls[0])
    assert firsts == URLS
    # Rotation keeps the cyclic order (each worker fails over to its next node).
    assert config(CELERY_BROKER_ROTATION="1")["broker_url"] == [URLS[1], URLS[2], URLS[0]]
    assert config(CELERY_BROKER_ROTATION="4")["broker_url"][0] == URLS[1]


def test_rotation_from_hostname_is_stable_and_spreads() -> None:
    pods = [f"counter-7d9f8c6b5-{suffix}" for suffix in ("x2k4p", "q8zr1", "m3n7t", "b5c6d")]
    pods += [f"worker-{i}" for i in range(30)]
    firsts = {config(HOSTNAME=p)["broker_url"][0] for p in pods}
    assert firsts == set(URLS), "hostnames spread over all nodes"
    # Stable: not Python's per-process salted hash().
    assert stable_rotation("worker-7", 3) == stable_rotation("worker-7", 3)
    assert config(HOSTNAME="worker-7")["broker_url"] == config(HOSTNAME="worker-7")["broker_url"]
    for p in pods:
        urls = config(HOSTNAME=p)["broker_url"]
        assert sorted(urls) == sorted(URLS)


def test_single_url_is_fine() -> None:
    conf = celery_config(WorkerSettings.from_env({"CELERY_BROKER_URLS": URLS[0]}))
    assert conf["broker_url"] == [URLS[0]]


# --- bad environment values ------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "var", "value_shown"),
    [
        ({"CELERY_BROKER_ROTATION": "-1"}, "CELERY_BROKER_ROTATION", "-1"),
        ({"CELERY_BROKER_ROTATION": "one"}, "CELERY_BROKER_ROTATION", "one"),
        ({"CELERY_POOL": "gevent"}, "CELERY_POOL", "gevent"),
        ({"CELERY_CONCURRENCY": "0"}, "CELERY_CONCURRENCY", "0"),
        ({"CELERY_CONCURRENCY": "lots"}, "CELERY_CONCURRENCY", "lots"),
        ({"CELERY_POOL": "solo", "CELERY_CONCURRENCY": "4"}, "CELERY_CONCURRENCY", "4"),
        ({"CELERY_BROKER_HEARTBEAT": "-5"}, "CELERY_BROKER_HEARTBEAT", "-5"),
        ({"CELERY_QUEUE": "two words"}, "CELERY_QUEUE", "two words"),
        ({"CELERY_PUBLISH_RETRY_SECONDS": "0"}, "CELERY_PUBLISH_RETRY_SECONDS", "0"),
        ({"CELERY_PUBLISH_RETRY_SECONDS": "nan"}, "CELERY_PUBLISH_RETRY_SECONDS", "nan"),
        ({"CELERY_PUBLISH_RETRY_SECONDS": "1e9"}, "CELERY_PUBLISH_RETRY_SECONDS", "1e9"),
        ({"CELERY_PUBLISH_RETRY_SECONDS": "soon"}, "CELERY_PUBLISH_RETRY_SECONDS", "soon"),
        ({"CELERY_REMOTE_CONTROL": "yes"}, "CELERY_REMOTE_CONTROL", "yes"),
    ],
)
def test_bad_values_name_var_value_and_allowed(
    extra: dict[str, str], var: str, value_shown: str
) -> None:
    with pytest.raises(ValueError) as err:
        WorkerSettings.from_env(env(**extra))
    msg = str(err.value)
    assert var in msg
    assert repr(value_shown) in msg or value_shown in msg
    assert "expected" in msg


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        "http://user:s3cret@rmq-0:5672/",
        "amqp://user:s3cret@rmq-0:5672/,,amqp://user:s3cret@rmq-1:5672/",
        "amqp://user:s3cret@rmq-0:5672/,amqp://user:s3cret@rmq-0:5672/",
        "amqp://user:s3cret@rmq-0:notaport/",
        "amqp:///vhost",
        "rmq-0:5672",
    ],
)
def test_bad_broker_urls_are_rejected_without_leaking_passwords(raw: str) -> None:
    with pytest.raises(ValueError) as err:
        WorkerSettings.from_env({"CELERY_BROKER_URLS": raw})
    msg = str(err.value)
    assert "CELERY_BROKER_URLS" in msg
    assert "amqp://" in msg  # says what is allowed
    assert "s3cret" not in msg


@pytest.mark.parametrize(
    "settings",
    [
        WorkerSettings.from_env(env()),
        WorkerSettings.from_env({"CELERY_BROKER_URLS": URLS[0], "HOSTNAME": "solo-1"}),
        WorkerSettings.from_env(
            env(
                CELERY_BROKER_ROTATION="2",
                CELERY_QUEUE="work",
                CELERY_POOL="prefork",
                CELERY_CONCURRENCY="3",
                CELERY_BROKER_HEARTBEAT="0",
                CELERY_PUBLISH_RETRY_SECONDS="12.5",
            )
        ),
        WorkerSettings(
            broker_urls=tuple(URLS),
            rotation=1,
            hostname="pod-x",
            queue="q",
            pool="solo",
            concurrency=1,
            heartbeat=30,
            publish_retry_seconds=1.0,
            remote_control=True,
        ),
    ],
)
def test_to_env_is_the_inverse_of_from_env(settings: WorkerSettings) -> None:
    environ = settings.to_env()
    assert all(isinstance(v, str) for v in environ.values())
    assert WorkerSettings.from_env(environ) == settings
    assert environ["CELERY_BROKER_URLS"] == ",".join(settings.broker_urls)
    assert environ["CELERY_BROKER_ROTATION"] == str(settings.rotation)
    assert environ["CELERY_BROKER_HEARTBEAT"] == str(settings.heartbeat)


def test_localcluster_workers_env_is_to_env(tmp_path: Path) -> None:
    """localcluster writes the worker environment through to_env(), not literals."""
    from localcluster.workers import Workers

    w = Workers(URLS, "q1", tmp_path / "ledger", tmp_path, concurrency=3, heartbeat=5)
    for rotation in (None, 0, 2):
        environ = w.env(rotation, "w1", publish_retry_seconds=7.0)
        settings = w.settings(rotation, 7.0)
        assert WorkerSettings.from_env(environ) == settings
        assert environ.items() >= settings.to_env().items()
        assert settings.publish_retry_seconds == 7.0 and settings.concurrency == 3
    assert w.settings(4).rotation == 1


def test_bad_value_is_a_settings_error_one_line() -> None:
    from app.settings import SettingsError

    with pytest.raises(SettingsError) as err:
        WorkerSettings.from_env(env(CELERY_POOL="a\nb"))
    assert "\n" not in str(err.value)


def test_missing_broker_urls() -> None:
    with pytest.raises(ValueError, match="CELERY_BROKER_URLS is not set"):
        WorkerSettings.from_env({})


def test_step_seconds_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_BROKER_URLS", ",".join(URLS))  # app.tasks imports the app
    from app.tasks import default_step_seconds

    assert default_step_seconds({}) == 1.0
    assert default_step_seconds({"COUNT_STEP_SECONDS": "0.01"}) == 0.01
    for bad in ("-1", "nan", "inf", "fast"):
        with pytest.raises(ValueError, match="COUNT_STEP_SECONDS"):
            default_step_seconds({"COUNT_STEP_SECONDS": bad})


def test_settings_docstring_states_the_delivery_contract() -> None:
    import app.settings

    doc = app.settings.__doc__ or ""
    assert "at-least-once" in doc.lower()
    assert "idempotent" in doc.lower()


# --- ledger -------------------------------------------------------------------------


def _line(event: str, tid: str, ts: float, worker: str = "w1@h") -> str:
    return json.dumps({"event": event, "task_id": tid, "ts": ts, "worker": worker, "pid": 1})


def test_ledger_reader_on_synthetic_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    lines = [
        _line("start", "a", 1.0),
        _line("finish", "a", 2.0),
        _line("start", "b", 1.5, "w1@h"),  # w1 killed while running b
        _line("start", "b", 3.0, "w2@h"),  # redelivered to w2
        _line("finish", "b", 4.0, "w2@h"),
        _line("start", "c", 5.0),  # never finished
        '{"event": "start", "task_',  # torn line
        "",
        _line("finish", "z", 6.0),  # not published by us
    ]
    path.write_text("\n".join(lines) + "\n")
    s = ledger.read_ledger(path)
    assert s.starts == {"a": 1, "b": 2, "c": 1}
    assert s.completed == {"a", "b", "z"}
    assert s.duplicates == {"b": 2}
    assert s.workers["b"] == ["w1@h", "w2@h"]
    assert s.unfinished == {"c"}
    assert s.malformed_lines == 1
    assert s.first_finish == {"a": 2.0, "b": 4.0, "z": 6.0}
    assert s.completion_times() == [2.0, 4.0, 6.0]
    assert s.lost(["a", "b", "c", "d"]) == {"c", "d"}
    report = s.report(["a", "b", "c", "d"])
    assert report == {
        "published": 4,
        "completed": 2,
        "lost": 2,
        "duplicate_ids": 1,
        "extra_executions": 1,
        "unexpected_ids": 0,
        "malformed_lines": 1,
    }


def test_ledger_missing_file_is_empty(tmp_path: Path) -> None:
    s = ledger.read_ledger(tmp_path / "nope")
    assert s.completed == set()
    assert s.lost(["x"]) == {"x"}


def test_ledger_appends_are_atomic_across_threads(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    n_threads, per_thread = 8, 200

    def writer(k: int) -> None:
        for i in range(per_thread):
            tid = f"t{k}-{i}-" + "x" * 200  # long-ish lines
            ledger.append_record(path, {"event": "start", "task_id": tid, "ts": 1.0})
            ledger.append_record(path, {"event": "finish", "task_id": tid, "ts": 2.0})

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = ledger.read_ledger(path)
    assert s.malformed_lines == 0
    assert len(s.completed) == n_threads * per_thread
    assert not s.duplicates


def test_read_ids(tmp_path: Path) -> None:
    p = tmp_path / "ids.txt"
    p.write_text("a\nb\n\nc\n")
    assert ledger.read_ids(p) == ["a", "b", "c"]


def test_scheduler_help_needs_no_broker() -> None:
    from app.scheduler import main

    result = CliRunner().invoke(main, ["--help"], env={"CELERY_BROKER_URLS": ""})
    assert result.exit_code == 0, result.output
    for opt in ("--tasks", "--task-seconds", "--ids-file"):
        assert opt in result.output


def test_sanitize_url() -> None:
    from app.settings import sanitize_url

    assert sanitize_url("amqp://u:p%40ss@h:5672/v") == "amqp://u:**@h:5672/v"
    assert sanitize_url("amqp://u:p/ss@h:bad/v") == "amqp://u:**@h:bad/v"
    assert sanitize_url("amqp://h:5672/v") == "amqp://h:5672/v"


# --- consumer bootstep: delayed delivery through the connected node ------------------


def test_cluster_consumer_replaces_only_the_delayed_delivery_step() -> None:
    from celery.worker.consumer import Consumer

    from app.bootsteps import _LIVENESS_STEP, _OUR_STEP, _STOCK_STEP, ClusterConsumer

    stock = Consumer.Blueprint.default_steps
    assert _STOCK_STEP in stock, "Celery renamed the step: the replacement would be a no-op"
    ours = ClusterConsumer.Blueprint.default_steps
    assert _STOCK_STEP not in ours
    assert ours == [*(_OUR_STEP if s == _STOCK_STEP else s for s in stock), _LIVENESS_STEP]
    assert config()["worker_consumer"] == "app.bootsteps:ClusterConsumer"


def test_connected_first() -> None:
    from app.bootsteps import connected_first

    urls = ["amqp://u:p@h0:5672/v", "amqp://u:p@h1:5673/v", "amqp://u:p@h2:5674/v"]
    assert connected_first(urls, "h1", 5673) == [urls[1], urls[0], urls[2]]
    assert connected_first(urls, "H2", 5674)[0] == urls[2]
    assert connected_first(urls, "elsewhere", 1) == urls


def test_cluster_delayed_delivery_uses_the_connected_node_then_falls_back() -> None:
    from types import SimpleNamespace

    from celery import Celery

    from app.bootsteps import ClusterDelayedDelivery

    app = Celery("dd-test")
    app.conf.update(config())
    urls = app.conf.broker_url
    calls: list[str] = []
    fail: set[str] = set()

    class Step(ClusterDelayedDelivery):
        def __init__(self) -> None:  # no blueprint needed
            pass

        def _setup_delayed_delivery(self, c: object, broker_url: str) -> None:
            calls.append(broker_url)
            if broker_url in fail:
                raise ValueError("declare failed")

    connected = SimpleNamespace(hostname="rmq-2.rmq.celery.svc", port=5672)
    c = SimpleNamespace(app=app, connection=connected)
    Step().start(c)
    assert calls == [URLS[2]], "only the node we are connected to"

    calls.clear()
    fail.add(URLS[2])
    Step().start(c)
    assert calls[0] == URLS[2]
    assert calls[1] in urls and calls[1] != URLS[2]
    assert len(calls) == 2


# --- liveness ----------------------------------------------------------------------------


def test_liveness_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.liveness import main, touch

    path = tmp_path / "alive"
    runner = CliRunner()
    missing = runner.invoke(main, ["--file", str(path)])
    assert missing.exit_code == 1
    touch(path)
    fresh = runner.invoke(main, ["--file", str(path), "--max-age", "60"])
    assert fresh.exit_code == 0, fresh.output
    os.utime(path, (0, 1_000))
    stale = runner.invoke(main, ["--file", str(path), "--max-age", "60"])
    assert stale.exit_code == 1
    monkeypatch.setenv("CELERY_LIVENESS_FILE", str(path))
    touch()
    assert runner.invoke(main, []).exit_code == 0
    touch(tmp_path / "no" / "such" / "dir")  # never raises


def test_liveness_touched_while_reconnecting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The consumer's connection-retry callback keeps the heartbeat fresh."""
    from app.bootsteps import ClusterConsumer
    from app.liveness import age_seconds

    path = tmp_path / "alive"
    monkeypatch.setenv("CELERY_LIVENESS_FILE", str(path))
    seen: list[float | None] = []

    class FakeConn:
        def ensure_connection(
            self, errback: object = None, max_retries: object = None, callback: Any = None
        ) -> FakeConn:
            seen.append(age_seconds(path))
            callback()  # kombu: once per retry (about every second)
            seen.append(age_seconds(path))
            return self

    from celery import Celery

    app = Celery("liveness-test")
    app.conf.update(config())
    consumer = ClusterConsumer.__new__(ClusterConsumer)
    consumer.app = app
    consumer.first_connection_attempt = True
    consumer.broker_connection_retry_attempt = 0
    conn = FakeConn()
    assert consumer.ensure_connected(conn) is conn
    assert seen[0] is None and seen[1] is not None and seen[1] < 5
    assert "ensure_connection" not in vars(conn), "the wrapper is removed afterwards"


def test_scheduler_counts_failures_writes_only_confirmed_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publish that failed after every retry: reported, not in the ids file, exit 1."""
    import contextlib

    monkeypatch.setenv("CELERY_BROKER_URLS", ",".join(URLS))
    import app.celery
    import app.tasks
    from app.scheduler import main

    calls: list[dict[str, Any]] = []

    def fake_apply_async(**kw: Any) -> None:
        calls.append(kw)
        if len(calls) == 3:
            raise ConnectionError("broker gone for good")

    monkeypatch.setattr(app.tasks.count, "apply_async", fake_apply_async)
    monkeypatch.setattr(
        app.celery.app, "producer_or_acquire", lambda *a, **k: contextlib.nullcontext(None)
    )
    ids_file = tmp_path / "ids.txt"
    result = CliRunner().invoke(
        main,
        ["--tasks", "5", "--task-seconds", "0.5", "--ids-file", str(ids_file), "--no-progress"],
    )
    assert result.exit_code == 1, result.output
    assert "published=4 failed=1" in result.output
    ids = ledger.read_ids(ids_file)
    assert len(ids) == 4
    assert calls[2]["task_id"] not in ids
    assert all(c["kwargs"] == {"step_seconds": 0.5} for c in calls)
    assert [c["task_id"] for c in calls if c["task_id"] != calls[2]["task_id"]] == ids
