"""Stopping a run cleanly on SIGTERM or Ctrl-C: the loop finishes its step, checkpoints it,
and every rank raises `Stopped`, whose exit code is the one a shell reports for that signal."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator


class Stopped(Exception):
    """SIGTERM or Ctrl-C ended the run at a step boundary, after a checkpoint of that step
    (every rank raises it; `rank` says which one this is). Its exit code is what a shell
    reports for a process killed by that signal: 143 for SIGTERM, 130 for SIGINT."""

    def __init__(self, message: str, rank: int = 0, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.rank = rank
        self.exit_code = 128 + int(signum)


class StopOnSignal:
    """While active, SIGTERM and SIGINT (Ctrl-C) set `requested` to the signal's number (the
    loop stops after the current step); a second one interrupts at once (KeyboardInterrupt),
    except within DUPLICATE_S of the first, where it is the same stop delivered twice
    (torchrun forwards a stop to its workers, which a terminal's Ctrl-C or Slurm's scancel
    has already reached), and except inside `protect()` (a checkpoint being written), where
    it waits for the block to end (a third one quits even there). Signals reach the main
    thread only, so in any other thread this does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    DUPLICATE_S = 1.0

    def __init__(self) -> None:
        self.requested = 0
        self._first_at = 0.0
        self._protected = False
        self._urgent = False  # a second signal arrived inside protect()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, signal.SIG_DFL if previous is None else previous)
        self._previous = {}

    @contextlib.contextmanager
    def protect(self) -> Iterator[None]:
        """A block a second signal must not cut short (a checkpoint save): it interrupts
        right after the block instead."""
        self._protected = True
        try:
            yield
        finally:
            self._protected = False
        if self._urgent:
            raise KeyboardInterrupt

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.requested:
            if now - self._first_at < self.DUPLICATE_S:
                return  # the same stop, delivered again by a launcher
            if self._protected and not self._urgent:  # a third one quits even there
                self._urgent = True
                return
            raise KeyboardInterrupt
        self.requested, self._first_at = signum, now
        if signum == signal.SIGINT:
            print(
                "\nCtrl-C: stopping after this step with a checkpoint (again to quit now)",
                file=sys.stderr,
                flush=True,
            )
