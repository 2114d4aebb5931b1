"""What ``python -m localcluster`` and ``python -m bench`` share as command-line fronts:
messages, the live progress line, and the guarded run (signals become an exception,
cleanup runs with signals ignored, whatever happened).

One home so the two commands print, interrupt and clean up the same way.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP arrived: stop everything and report what was measured."""


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP raise :class:`Interrupted` in the main thread."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Cleanup must not be interrupted half-way (our children run in their own
    sessions or pods: a terminal's Ctrl-C reaches only us)."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class Console:
    """``[name] message`` lines on stderr, and one progress line refreshed in place on a
    terminal (every ``every_tty`` s) or printed every ``every_pipe`` s into a log."""

    def __init__(self, name: str, every_tty: float = 1.0, every_pipe: float = 5.0) -> None:
        self.name = name
        self.tty = sys.stderr.isatty()
        self.every = every_tty if self.tty else every_pipe
        self._line: Callable[[], str | None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def say(self, message: str) -> None:
        prefix = "\r\x1b[K" if self.tty else ""
        print(f"{prefix}[{self.name}] {message}", file=sys.stderr, flush=True)

    def show(self, line: Callable[[], str | None] | None) -> None:
        """From now on the progress line is ``line()`` (None: nothing to show)."""
        self._line = line
        if self._thread is None and line is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            line = self._line
            if line is None:
                continue
            try:
                text = line()
            except Exception as exc:  # the display must never kill the run
                text = f"(progress unavailable: {exc!r})"
            if text is None:
                continue
            if self.tty:
                print(f"\r\x1b[K{text}", end="", file=sys.stderr, flush=True)
            else:
                print(text, file=sys.stderr, flush=True)

    def stop(self) -> None:
        self._line = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
            if self.tty:
                print(file=sys.stderr)


@dataclass
class Outcome:
    """How a guarded run ended: ``ok``, ``interrupted`` or ``error``, and what went wrong
    (the error first, then every problem cleanup found)."""

    status: str = "ok"
    problems: list[str] = field(default_factory=list)

    @property
    def exit_interrupted(self) -> bool:
        return self.status == "interrupted"


def run_guarded(
    execute: Callable[[], None], close: Callable[[bool], list[str]], console: Console
) -> Outcome:
    """``execute()`` with signals raising :class:`Interrupted`, then ``close(failed)``
    with signals ignored, on every exit path; an error's traceback goes to stderr."""
    outcome = Outcome()
    error: BaseException | None = None
    try:
        with signals_interrupt():
            execute()
    except (Interrupted, KeyboardInterrupt) as exc:
        outcome.status, error = "interrupted", exc
    except Exception as exc:
        outcome.status, error = "error", exc
    finally:
        with signals_ignored():
            console.stop()
            console.say("stopping everything this run started")
            outcome.problems = close(error is not None)
    if error is not None:
        if outcome.status == "error":
            traceback.print_exception(error, file=sys.stderr)
        outcome.problems.insert(0, f"{outcome.status}: {error!r}")
    return outcome
