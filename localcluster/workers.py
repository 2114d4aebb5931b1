"""Start, stop and kill real Celery worker processes (and the scheduler) on this machine.

Used by the integration tests and by ``python -m localcluster`` (``make local``).

Every worker is ``celery -A app.celery worker --pool threads ...`` (or another
Celery app module: ``Workers(app=...)``, the benchmark runs the article's) run as a
subprocess in its own session (``start_new_session=True``), so its whole
process group can be signalled; every process carries a per-``Workers``
marker in its environment so stragglers can be found and killed.
``Workers.close()`` kills everything it started and verifies nothing survived;
use it as a context manager (or from a fixture's teardown), pass or fail.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from app.liveness import ENV_LIVENESS_FILE
from app.settings import (
    ENV_HOSTNAME,
    ENV_LEDGER,
    ENV_STEP_SECONDS,
    WorkerSettings,
    stable_rotation,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CELERY_BIN = Path(sys.executable).with_name("celery")
MARKER_ENV = "LOCALCLUSTER_WORKERS_ID"


def _marked_pids(marker: str) -> set[int]:
    """Live processes whose environment carries ``MARKER_ENV=marker``."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes()
            state = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        if state[state.rindex(")") + 2 :].startswith(("Z", "X")):
            continue  # already dead (zombie awaiting its parent)
        if needle in environ.split(b"\0"):
            found.add(int(entry.name))
    return found


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


@dataclass
class WorkerProc:
    """One worker process."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def nodename_prefix(self) -> str:
        """Prefix of ``task.request.hostname`` (``name@host``) in the ledger."""
        return f"{self.name}@"

    @property
    def liveness_file(self) -> Path:
        return self.log_path.with_suffix(".alive")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self, lines: int = 60) -> str:
        return _tail(self.log_path, lines)

    def wait_ready(self, timeout: float = 60) -> None:
        """Until the worker logs ``<name>@<host> ready.`` (consuming)."""
        deadline = time.monotonic() + timeout
        needle = f"{self.name}@"
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(
                    f"worker {self.name} exited with {self.proc.returncode} before ready:\n"
                    + self.log()
                )
            try:
                text = self.log_path.read_text(errors="replace")
            except OSError:
                text = ""
            if any(needle in line and " ready." in line for line in text.splitlines()):
                return
            time.sleep(0.1)
        raise TimeoutError(f"worker {self.name} not ready after {timeout:.0f} s:\n{self.log()}")

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole process group (a machine dying), and reap it."""
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def terminate(self) -> None:
        """SIGTERM: Celery's warm shutdown (what Kubernetes sends first)."""
        self.signal_group(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)


@dataclass
class SchedulerProc:
    """A running ``python -m app.scheduler``."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    ids_file: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def published_ids(self) -> list[str]:
        if not self.ids_file.exists():
            return []
        return [x for x in self.ids_file.read_text().splitlines() if x.strip()]


class Workers:
    """Worker processes sharing one broker list, queue and ledger."""

    def __init__(
        self,
        broker_urls: Sequence[str],
        queue: str,
        ledger: Path,
        workdir: Path,
        *,
        concurrency: int = 4,
        step_seconds: float = 0.01,
        pool: str = "threads",
        heartbeat: int = 10,
        app: str = "app.celery",
    ) -> None:
        self.broker_urls = list(broker_urls)
        self.queue = queue
        self.ledger = Path(ledger)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.concurrency = concurrency
        self.step_seconds = step_seconds
        self.pool = pool
        self.heartbeat = heartbeat
        self.app = app
        self.marker = uuid.uuid4().hex
        self.procs: list[WorkerProc] = []
        self._schedulers: list[SchedulerProc] = []

    def settings(
        self, rotation: int | None = None, publish_retry_seconds: float | None = None
    ) -> WorkerSettings:
        """What a process started here gets from ``WorkerSettings.from_env()``.

        ``rotation`` None: derived from the host name, as a pod's would be.
        """
        hostname = os.environ.get(ENV_HOSTNAME, "").strip() or socket.gethostname()
        n = len(self.broker_urls)
        settings = WorkerSettings(
            broker_urls=tuple(self.broker_urls),
            rotation=stable_rotation(hostname, n) if rotation is None else rotation % n,
            hostname=hostname,
            queue=self.queue,
            pool=self.pool,
            concurrency=self.concurrency,
            heartbeat=self.heartbeat,
        )
        if publish_retry_seconds is not None:
            settings = dataclasses.replace(settings, publish_retry_seconds=publish_retry_seconds)
        return settings

    def env(
        self,
        rotation: int | None = None,
        name: str | None = None,
        *,
        publish_retry_seconds: float | None = None,
    ) -> dict[str, str]:
        settings = self.settings(rotation, publish_retry_seconds)
        # Nothing of this process's Celery environment leaks into the children
        # (Celery itself reads CELERY_* variables too): only what is set here.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("CELERY_", ENV_LEDGER, ENV_STEP_SECONDS))
        }
        env.update(settings.to_env())
        # Fail here, with the variable named, rather than in the child.
        if WorkerSettings.from_env(env) != settings:
            raise ValueError(f"settings do not survive the environment: {settings}")
        env.update(
            {
                MARKER_ENV: self.marker,
                "PYTHONPATH": str(REPO_ROOT),
                "PYTHONUNBUFFERED": "1",
                ENV_STEP_SECONDS: repr(self.step_seconds),
                ENV_LEDGER: str(self.ledger),
            }
        )
        if name is not None:
            env[ENV_LIVENESS_FILE] = str(self.workdir / f"{name}.alive")
        return env

    def start(self, name: str, rotation: int | None = None) -> WorkerProc:
        """Start one worker named ``name`` (nodename ``name@host``); not yet ready."""
        log_path = self.workdir / f"{name}.log"
        cmd = [
            str(CELERY_BIN),
            "-A",
            self.app,
            "worker",
            "--pool",
            self.pool,
            "--concurrency",
            str(self.concurrency),
            "-n",
            f"{name}@%h",
            "--loglevel=INFO",
            # Startup speed: no neighbour sync, no gossip (not needed for tasks).
            "--without-mingle",
            "--without-gossip",
        ]
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=REPO_ROOT,
                env=self.env(rotation, name),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = WorkerProc(name, proc, log_path)
        self.procs.append(worker)
        return worker

    def start_many(self, names: Sequence[str], timeout: float = 60) -> list[WorkerProc]:
        """Start workers with rotations 0, 1, 2, ... in parallel; wait until all ready."""
        started = [self.start(n, rotation=i) for i, n in enumerate(names)]
        for w in started:
            w.wait_ready(timeout)
        return started

    def scheduler(
        self,
        n_tasks: int,
        ids_file: Path,
        *,
        step_seconds: float | None = None,
        rotation: int | None = 0,
        rate: float = 0.0,
        publish_retry_seconds: float | None = None,
        extra_args: Sequence[str] = (),
    ) -> SchedulerProc:
        """Start ``python -m app.scheduler`` (not waited for); output in workdir.

        ``publish_retry_seconds``: its publish retry budget (default: the shipped
        one); ``extra_args``: more scheduler options (``--unconfirmed-file``, ...).
        """
        out_path = self.workdir / f"scheduler-{len(self._schedulers)}.log"
        cmd = [
            sys.executable,
            "-m",
            "app.scheduler",
            "--task-seconds",
            repr(self.step_seconds if step_seconds is None else step_seconds),
            "--ids-file",
            str(ids_file),
            "--rate",
            repr(rate),
            "--no-progress",
            *extra_args,
        ]
        if "--publish-ids" not in extra_args:
            cmd += ["--tasks", str(n_tasks)]
        with open(out_path, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=REPO_ROOT,
                env=self.env(rotation, publish_retry_seconds=publish_retry_seconds),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        sched = SchedulerProc(proc, out_path, Path(ids_file))
        self._schedulers.append(sched)
        return sched

    def publish(
        self, n_tasks: int, ids_file: Path, timeout: float = 120, extra_args: Sequence[str] = ()
    ) -> str:
        """Run the scheduler to completion; return its output; raise if it failed."""
        sched = self.scheduler(n_tasks, ids_file, extra_args=extra_args)
        try:
            code = sched.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(sched.proc.pid, signal.SIGKILL)
            raise
        if code != 0:
            raise RuntimeError(f"scheduler exited with {code}:\n{sched.output()}")
        return sched.output()

    def leftover_pids(self) -> set[int]:
        return _marked_pids(self.marker)

    def close(self) -> None:
        """SIGKILL every process group started here; verify none survives."""
        procs = [w.proc for w in self.procs] + [s.proc for s in self._schedulers]
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        left = self.leftover_pids()
        while left and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
            left = self.leftover_pids()
        if left:
            raise RuntimeError(f"worker processes survived close(): {sorted(left)}")

    def __enter__(self) -> Workers:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
