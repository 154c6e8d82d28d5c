"""Stopping a run cleanly on SIGTERM or Ctrl-C: the loop finishes its step, checkpoints it,
and every rank raises `Stopped`, whose exit code is the one a shell reports for that signal."""

from __future__ import annotations

import signal
import sys
import threading


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
    loop stops after the current step); a second one interrupts at once (KeyboardInterrupt).
    Signals reach the main thread only, so in any other thread this does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, signal.SIG_DFL if previous is None else previous)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signum
        if signum == signal.SIGINT:
            print(
                "\nCtrl-C: stopping after this step with a checkpoint (again to quit now)",
                file=sys.stderr,
                flush=True,
            )
