"""StopOnSignal: the first SIGTERM/SIGINT asks for a stop after the step; a second one quits at
once, unless it is the same stop delivered twice (within DUPLICATE_S) or a checkpoint is being
written (protect()), which it lets finish first."""

from __future__ import annotations

import os
import signal
import time

import pytest

from braid.train.signals import StopOnSignal


def _signal(signum: int = signal.SIGTERM) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.01)  # let the handler run (it runs between bytecodes of the main thread)


class _Clock:  # the handler's time, moved by the test (a loaded machine cannot skew it)
    now = 100.0

    def monotonic(self) -> float:
        return self.now


def test_a_forwarded_duplicate_is_the_same_stop_and_a_later_one_quits(monkeypatch):
    from braid.train import signals

    clock = _Clock()
    monkeypatch.setattr(signals, "time", clock)
    with StopOnSignal() as stop:
        _signal()
        clock.now += 0.9 * StopOnSignal.DUPLICATE_S
        _signal(signal.SIGINT)  # torchrun forwarding the same stop: not a second request
        assert stop.requested == signal.SIGTERM
        clock.now += 0.2 * StopOnSignal.DUPLICATE_S
        with pytest.raises(KeyboardInterrupt):
            _signal()


def test_a_second_signal_during_a_save_waits_for_the_save(monkeypatch):
    monkeypatch.setattr(StopOnSignal, "DUPLICATE_S", 0.0)
    finished = []
    with StopOnSignal() as stop:
        _signal()
        with pytest.raises(KeyboardInterrupt):
            with stop.protect():
                _signal()  # would quit at once outside protect()
                finished.append(True)  # the save goes on to its end
        assert finished == [True]


def test_a_third_signal_quits_even_during_a_save(monkeypatch):
    monkeypatch.setattr(StopOnSignal, "DUPLICATE_S", 0.0)
    with StopOnSignal() as stop:
        _signal()
        with pytest.raises(KeyboardInterrupt):
            with stop.protect():
                _signal()  # deferred
                _signal()  # a stuck save: quits now
                pytest.fail("the third signal did not quit")
