"""The publish retry budget (app.publish) and bad environment values at start-up.

No broker: "no node answers" is three refused ports on 127.0.0.1, which is what
kombu sees when every RabbitMQ node is down.  The same budget against a real
cluster that is stopped and started: tests/integration/test_publish_outage.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import celery
import pytest
from celery import Celery
from click.testing import CliRunner
from kombu.exceptions import OperationalError

from app import ledger
from app.publish import BudgetedTask, PublishBudgetExceeded, publish_with_budget
from app.settings import PUBLISH_CONFIRM_TIMEOUT_SECONDS, WorkerSettings, celery_config

REPO_ROOT = Path(__file__).resolve().parents[2]
CELERY_BIN = Path(sys.executable).with_name("celery")
# Nothing listens there: every connection attempt is refused at once.
DEAD_URLS = ",".join(f"amqp://x:s3cret@127.0.0.1:{port}//" for port in (1, 2, 3))
GOOD_URLS = "amqp://u:s3cret@rmq-0:5672/v,amqp://u:s3cret@rmq-1:5672/v"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeConnection:
    def __init__(self, urls: list[str]) -> None:
        self.alt = urls
        self.current = 0

    def as_uri(self) -> str:
        return self.alt[self.current]

    def maybe_switch_next(self) -> None:
        self.current = (self.current + 1) % len(self.alt)


class FakeProducer:
    def __init__(self, urls: list[str]) -> None:
        self.connection = FakeConnection(urls)
        self.revived = 0

    def revive(self, connection: object) -> None:
        assert connection is self.connection
        self.revived += 1


NODES = [f"amqp://u:s3cret@rmq-{i}:5672/v" for i in range(3)]


def test_retries_every_node_then_backs_off_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    producer = FakeProducer(NODES)
    calls: list[int] = []

    def send() -> str:
        calls.append(producer.connection.current)
        if len(calls) <= 7:
            clock.now += 0.01
            raise OperationalError("[Errno 111] Connection refused")
        return "sent"

    caplog.set_level(logging.WARNING, logger="app.publish")
    result = publish_with_budget(
        send, task_id="t1", budget=90, producer=producer, clock=clock.clock, sleep=clock.sleep
    )
    assert result == "sent"
    # Each node in turn; a pause only after a whole round failed: 1, 2, ... s.
    assert calls == [0, 1, 2, 0, 1, 2, 0, 1]
    assert clock.sleeps == [0, 0, 1, 0, 0, 2, 0]
    assert producer.revived == 7  # a fresh channel for every new attempt
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 8
    assert "attempt 1 via amqp://u:**@rmq-0:5672/v failed" in lines[0]
    assert "next attempt in 0.0 s via amqp://u:**@rmq-1:5672/v" in lines[0]
    assert "retrying for 0.0 s of the 90 s budget" in lines[0]
    assert "retrying for 3.1 s of the 90 s budget" in lines[6]
    assert "confirmed via amqp://u:**@rmq-1:5672/v after 3.1 s" in lines[7]
    assert all("s3cret" not in line for line in lines)


def test_gives_up_when_the_budget_is_spent() -> None:
    clock = FakeClock()
    producer = FakeProducer(NODES)

    def send() -> None:
        clock.now += 0.5  # each attempt takes a while (a connect timeout)
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(PublishBudgetExceeded) as err:
        publish_with_budget(
            send, task_id="t2", budget=20, producer=producer, clock=clock.clock, sleep=clock.sleep
        )
    exc = err.value
    assert exc.task_id == "t2" and exc.budget == 20
    assert 20 <= exc.elapsed < 21  # the last attempt is made at the deadline
    assert isinstance(exc.last, ConnectionRefusedError)
    assert exc.attempts == len(clock.sleeps) + 1
    assert max(clock.sleeps) == 3.0
    assert isinstance(exc, OperationalError)  # what callers already catch


def test_other_errors_are_not_retried() -> None:
    clock = FakeClock()

    def send() -> None:
        raise TypeError("not JSON serializable")

    with pytest.raises(TypeError):
        publish_with_budget(send, task_id="t3", budget=90, clock=clock.clock, sleep=clock.sleep)
    assert clock.sleeps == []


def test_every_task_of_the_app_is_budgeted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_BROKER_URLS", GOOD_URLS)
    import app.celery
    import app.tasks

    assert isinstance(app.tasks.count._get_current_object(), BudgetedTask)
    assert app.tasks.count.publish_retry_seconds == app.celery.settings.publish_retry_seconds


def test_real_kombu_publish_retries_for_the_budget_then_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Celery + kombu as shipped, every node refusing: retried for the budget (not
    the ~6 s kombu's connection step allows), every node named in the log."""
    settings = WorkerSettings.from_env({"CELERY_BROKER_URLS": DEAD_URLS, "HOSTNAME": "h"})

    class Task(BudgetedTask):
        publish_retry_seconds = 2.5

    app = Celery("budget-test", task_cls=Task, set_as_current=False)
    app.conf.update(celery_config(settings))

    @app.task(name="budget.noop")
    def noop() -> None:  # pragma: no cover - never runs
        pass

    caplog.set_level(logging.WARNING, logger="app.publish")
    t0 = time.monotonic()
    with pytest.raises(PublishBudgetExceeded) as err:
        noop.apply_async(task_id="dead-1")
    took = time.monotonic() - t0
    assert 2.5 <= took < 5, took
    assert err.value.task_id == "dead-1"
    assert "Connection refused" in repr(err.value.last)
    text = caplog.text
    for port in (1, 2, 3):
        assert f"via amqp://x:**@127.0.0.1:{port}//" in text
    assert "s3cret" not in text
    with contextlib.suppress(Exception):
        app.close()


def test_a_publish_waits_for_its_confirm_a_bounded_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node whose machine vanished never confirms: the publish must give up waiting
    (and be retried via the next node) instead of blocking until the node is replaced."""
    seen: list[dict[str, Any]] = []

    def recording_apply_async(self: Any, *args: Any, **options: Any) -> str:
        seen.append(options)
        return "sent"

    monkeypatch.setattr(celery.Task, "apply_async", recording_apply_async)
    settings = WorkerSettings.from_env({"CELERY_BROKER_URLS": DEAD_URLS, "HOSTNAME": "h"})
    app = Celery("confirm-timeout-test", task_cls=BudgetedTask, set_as_current=False)
    app.conf.update(celery_config(settings))

    @app.task(name="confirm.noop")
    def noop() -> None:  # pragma: no cover - never runs
        pass

    with contextlib.ExitStack() as stack:
        stack.callback(app.close)
        stack.enter_context(
            mock.patch.object(app, "producer_or_acquire", return_value=contextlib.nullcontext())
        )
        assert noop.apply_async(task_id="t1") == "sent"
        assert noop.apply_async(task_id="t2", confirm_timeout=1.0) == "sent"
    assert seen[0]["confirm_timeout"] == PUBLISH_CONFIRM_TIMEOUT_SECONDS == 5.0
    assert seen[1]["confirm_timeout"] == 1.0  # a caller's own choice is kept


# --- the scheduler ---------------------------------------------------------------------


def _run(
    args: list[str], env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_")}
    return subprocess.run(
        args,
        cwd=REPO_ROOT,
        env={**clean, "PYTHONPATH": str(REPO_ROOT), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_scheduler_with_no_node_retries_for_the_budget_and_lists_what_it_did_not_publish(
    tmp_path: Path,
) -> None:
    """The issue's command (budget shortened to 3 s): attempts logged, exit 1, ids listed."""
    unconfirmed = tmp_path / "unconfirmed.txt"
    t0 = time.monotonic()
    proc = _run(
        [
            sys.executable,
            "-m",
            "app.scheduler",
            "--tasks",
            "3",
            "--no-progress",
            "--ids-file",
            str(tmp_path / "ids.txt"),
            "--unconfirmed-file",
            str(unconfirmed),
        ],
        {"CELERY_BROKER_URLS": DEAD_URLS, "CELERY_PUBLISH_RETRY_SECONDS": "3"},
    )
    took = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr
    assert took < 3 + 10, took
    assert "published=0 failed=1 not_attempted=2" in proc.stdout
    assert "giving up: no RabbitMQ node took a publish for 3.0 s" in proc.stderr
    assert "CELERY_PUBLISH_RETRY_SECONDS=3" in proc.stderr
    assert proc.stderr.count("failed: OperationalError") >= 3
    assert "Traceback" not in proc.stderr and "s3cret" not in proc.stderr
    ids = ledger.read_ids(unconfirmed)
    assert len(ids) == 3 and len(set(ids)) == 3
    assert f"listed in {unconfirmed}" in proc.stderr
    assert f"--publish-ids {unconfirmed}" in proc.stderr
    assert not (tmp_path / "ids.txt").read_text().strip()


def test_scheduler_gives_up_on_budget_and_republishes_exactly_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CELERY_BROKER_URLS", GOOD_URLS)
    import app.celery
    import app.tasks
    from app.scheduler import main

    calls: list[str] = []

    def fake_apply_async(**kw: Any) -> None:
        calls.append(kw["task_id"])
        if len(calls) == 3:
            raise PublishBudgetExceeded(kw["task_id"], 90, 90.0, 40, OSError("refused"))

    monkeypatch.setattr(app.tasks.count, "apply_async", fake_apply_async)
    monkeypatch.setattr(
        app.celery.app, "producer_or_acquire", lambda *a, **k: contextlib.nullcontext(None)
    )
    ids_file, rest = tmp_path / "ids.txt", tmp_path / "rest.txt"
    runner = CliRunner()
    args = ["--ids-file", str(ids_file), "--unconfirmed-file", str(rest), "--no-progress"]
    result = runner.invoke(main, ["--tasks", "6", *args])
    assert result.exit_code == 1, result.output
    assert "published=2 failed=1 not_attempted=3" in result.output
    assert "giving up: no RabbitMQ node took a publish for 90.0 s" in result.output
    assert len(calls) == 3, "stops at the first publish that spent the budget"
    confirmed, unconfirmed = ledger.read_ids(ids_file), ledger.read_ids(rest)
    assert confirmed == calls[:2]
    assert unconfirmed[0] == calls[2] and len(unconfirmed) == 4
    assert not set(confirmed) & set(unconfirmed)

    calls.clear()
    monkeypatch.setattr(app.tasks.count, "apply_async", lambda **kw: calls.append(kw["task_id"]))
    again = runner.invoke(main, ["--publish-ids", str(rest), *args])
    assert again.exit_code == 0, again.output
    assert calls == unconfirmed
    assert ledger.read_ids(ids_file) == confirmed + unconfirmed

    both = runner.invoke(main, ["--tasks", "3", "--publish-ids", str(rest)])
    assert both.exit_code == 2 and "exclude each other" in both.output


# --- bad environment values: one line, exit 2, no traceback ------------------------


BAD_ENVS = [
    ({"CELERY_BROKER_URLS": "http://bad"}, "CELERY_BROKER_URLS", "'http://bad'"),
    (
        {"CELERY_BROKER_URLS": "http://user:s3cret@bad:5672/"},
        "CELERY_BROKER_URLS",
        "'http://user:**@bad:5672/'",
    ),
    ({"CELERY_BROKER_URLS": GOOD_URLS, "CELERY_POOL": "gevent"}, "CELERY_POOL", "'gevent'"),
    (
        {"CELERY_BROKER_URLS": GOOD_URLS, "CELERY_PUBLISH_RETRY_SECONDS": "-1"},
        "CELERY_PUBLISH_RETRY_SECONDS",
        "'-1'",
    ),
    ({}, "CELERY_BROKER_URLS is not set", ""),
]


def _assert_one_line(proc: subprocess.CompletedProcess[str], var: str, shown: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    (line,) = lines
    assert var in line and shown in line and "expected" in line, line
    assert "Traceback" not in proc.stderr and "s3cret" not in proc.stderr


@pytest.mark.parametrize(("env", "var", "shown"), BAD_ENVS)
def test_scheduler_bad_environment_one_line_exit_2(
    env: dict[str, str], var: str, shown: str
) -> None:
    proc = _run([sys.executable, "-m", "app.scheduler", "--tasks", "1"], env)
    _assert_one_line(proc, var, shown)
    assert proc.stderr.startswith("python -m app.scheduler: error: ")


@pytest.mark.parametrize(("env", "var", "shown"), BAD_ENVS[1:4])
def test_worker_bad_environment_one_line_exit_2(env: dict[str, str], var: str, shown: str) -> None:
    """The real worker command, as the Deployment runs it."""
    proc = _run([str(CELERY_BIN), "--app=app.celery", "worker", "--loglevel=INFO"], env)
    _assert_one_line(proc, var, shown)
    assert proc.stderr.startswith("app.celery: error: ")
