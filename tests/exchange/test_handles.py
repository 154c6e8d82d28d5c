"""`WorksHandle` on CPU (no ranks): `done()` is True only once every Work completed, and
`elapsed_ms()` is the host time from construction to the first poll or wait that found every
Work complete, not to a later `wait()` (the overlap engine polls while it drains, then waits
at the end of its window)."""

from __future__ import annotations

import torch

from braid.exchange import handles
from braid.exchange.handles import WorksHandle


class _Work:
    def __init__(self, completed: bool = False):
        self.completed, self.waited = completed, False

    def is_completed(self) -> bool:
        return self.completed

    def wait(self) -> bool:
        self.completed = self.waited = True
        return True


class _Clock:
    """A host clock the test advances by hand."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_works_handle_is_done_with_every_work_and_times_to_the_first_completed_poll(
    monkeypatch,
):
    clock = _Clock()
    monkeypatch.setattr(handles.time, "perf_counter", clock)
    works = [_Work(completed=True), _Work()]
    out = torch.arange(4.0)
    h = WorksHandle(works, out, finish=lambda t: t * 2)
    clock.now += 0.002
    assert not h.done() and h.elapsed_ms() is None  # one Work still in flight
    works[1].completed = True
    clock.now += 0.003
    assert h.done()  # first poll that finds every Work complete: 5 ms after issue
    clock.now += 0.010  # the caller waits only later
    assert torch.equal(h.wait(), out * 2) and all(w.waited for w in works)
    assert abs(h.elapsed_ms() - 5.0) < 1e-6


def test_works_handle_unpolled_times_to_the_wait(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(handles.time, "perf_counter", clock)
    h = WorksHandle([_Work(), _Work()], torch.zeros(2))
    clock.now += 0.004
    h.wait()
    assert abs(h.elapsed_ms() - 4.0) < 1e-6
