"""The chunked pipeline really overlaps: with C=3, each exchange is still in flight while the next
piece of compute runs, in forward and backward, and with split_dw queued weight grads run inside
exchange windows. A serialized schedule (every exchange waited right after its issue) computes
the same numbers, so only the order of events can tell them apart; that is what is checked.

One process, W = 1: `FakeExchange` is duck-typed like `braid.exchange.base.Exchange` (rows stay
where they are), but each movement stays in flight (`handle.done()` False) until its
handle is waited, as an NCCL all_to_all that takes longer than the compute beside it. The
schedule does not depend on W (W > 1 only adds the regroup permutations). `RecordingTimeline`
logs, in order: `issue <kind> c` and `waited <kind> c` for each exchange (kinds: dispatch_a2a,
combine_a2a, combine_a2a_bwd, dispatch_a2a_bwd; c = chunk), and the compute spans `experts c`,
`experts_bwd c`, `shared h` and `shared_bwd h` (h: the order of the shared experts' two token
halves), `dW` (a queued weight grad drained in a window) and `dW_flush` (run at the layer's
flush point instead).

That the checks can fail: `test_checks_fail_when_each_exchange_is_waited_right_after_issue`
runs the same layer with the recording timeline waiting (without a drain) right after every
issue, and expects every check to report violations. The checks were also run against a
serialized pipeline itself: in a scratch copy of braid/overlap/pipeline.py, `Schedule.forward` and
`Schedule.backward` were rewritten to wait each exchange (without a drain) right after its issue,
the shared experts after the first wait; the numerics tests still passed there, and every check
below reported a violation (7 forward, 5 backward, 6 drain with C=3).
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

from braid.exchange.base import Handle
from braid.moe.layer import MoE
from braid.overlap.engine import LayerOverlap
from braid.overlap.streams import Clock, InFlight
from braid.overlap.timeline import LayerTimeline
from braid.overlap.wgrad import WgradQueue
from small_moe import seeded_moe

C = 3


class FakeHandle(Handle):
    """In flight until `wait()` (then complete), as an exchange slower than the compute."""

    def __init__(self, out: torch.Tensor):
        self.out, self.finished = out, False

    def done(self) -> bool:
        return self.finished

    def wait(self) -> torch.Tensor:
        self.finished = True
        return self.out


class FakeExchange:
    """One rank (W = 1): every movement returns its rows, but only once waited."""

    size, rank = 1, 0

    def exchange_counts(self, send_counts_WL: torch.Tensor) -> torch.Tensor:
        return send_counts_WL.clone()

    def move(self, x_RD, send_splits, recv_splits) -> FakeHandle:
        assert sum(send_splits) == sum(recv_splits) == x_RD.shape[0]
        return FakeHandle(x_RD.clone())

    def dispatch(self, x_RD, send_splits, recv_splits) -> FakeHandle:
        return self.move(x_RD, send_splits, recv_splits)

    def combine(self, y_RD, send_splits, recv_splits) -> FakeHandle:
        return self.move(y_RD, send_splits, recv_splits)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone()


class RecordingTimeline(LayerTimeline):
    """A LayerTimeline that logs issues, completed waits and compute spans, in order.

    serialize=True waits (without draining dW) right after every issue: the schedule a
    pipeline without overlap would run, used to show that the checks can fail."""

    def __init__(self, log: list[str], serialize: bool = False):
        super().__init__(0, Clock(torch.device("cpu")))
        self.log, self.serialize = log, serialize
        self.count: Counter[str] = Counter()

    def _name(self, kind: str) -> str:
        c = self.count[kind]
        self.count[kind] += 1
        return f"{kind} {c}"

    def span(self, kind: str):
        if kind in ("experts", "experts_bwd", "shared", "shared_bwd"):
            self.log.append(self._name(kind))
        elif kind in ("dW", "dW_flush"):
            self.log.append(kind)
        return super().span(kind)

    def issue(self, kind, go, send) -> InFlight:
        name = self._name(kind)
        self.log.append(f"issue {name}")
        fl = super().issue(kind, go, send)
        fl.name = name
        if self.serialize:
            super().wait(fl)
            self.log.append(f"waited {name}")
        return fl

    def wait(self, fl: InFlight, drain=None) -> torch.Tensor:
        done = fl.handle.done()
        out = super().wait(fl, drain)
        if not done:
            self.log.append(f"waited {fl.name}")
        return out


def _step(moe: MoE, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_()
    y, _ = moe(x)
    y.square().sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in moe.parameters()]


def _max_rel(got: list, ref: list) -> float:
    return max(
        float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
        for a, b in zip(got, ref, strict=True)
    )


def _record(split_dw: bool, serialize: bool = False) -> tuple[list[str], list, list]:
    """(event log, results, plain-path results) of one forward + backward of a C=3 layer."""
    base = seeded_moe(num_shared_experts=1)
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))
    ref = _step(copy.deepcopy(base), x)  # the plain path, local exchange
    moe, log = base, []
    moe.dispatcher.exchange = FakeExchange()
    moe.overlap = lo = LayerOverlap(0, C, split_dw, Clock(torch.device("cpu")))
    lo.timeline = RecordingTimeline(log, serialize)  # the queue reports its spans to it too
    lo.queue = WgradQueue(lo.timeline.span)
    return log, _step(moe, x), ref


def _in_flight_during(log: list[str], kind: str, c: int, work: str) -> bool:
    """Exchange `kind` of chunk c was issued before `work` began and waited only after it."""
    issued, done, at = (log.index(e) for e in (f"issue {kind} {c}", f"waited {kind} {c}", work))
    return issued < at < done


def forward_violations(log: list[str], split_dw: bool) -> list[str]:
    """With split_dw the shared experts run in two token halves: the second beside the last
    combine (without, whole beside the first dispatch)."""
    bad = []
    if not _in_flight_during(log, "dispatch_a2a", 0, "shared 0"):
        bad.append("shared experts do not overlap dispatch 0")
    if split_dw and not _in_flight_during(log, "combine_a2a", C - 1, "shared 1"):
        bad.append(f"shared experts do not overlap combine {C - 1}")
    for c in range(C - 1):  # the next chunk's dispatch flies while this chunk's experts run
        if not _in_flight_during(log, "dispatch_a2a", c + 1, f"experts {c}"):
            bad.append(f"dispatch {c + 1} not in flight during experts {c}")
    for c in range(1, C):  # the previous chunk's combine flies while this chunk's experts run
        if not _in_flight_during(log, "combine_a2a", c - 1, f"experts {c}"):
            bad.append(f"combine {c - 1} not in flight during experts {c}")
        if not log.index(f"issue combine_a2a {c}") < log.index(f"waited combine_a2a {c - 1}"):
            bad.append(f"combine {c} issued only after combine {c - 1} completed")
    return bad


def backward_violations(log: list[str], split_dw: bool) -> list[str]:
    bad = []
    if not _in_flight_during(log, "combine_a2a_bwd", 0, "shared_bwd 0"):
        bad.append("shared-expert backward does not overlap the combine gradient 0")
    if split_dw and not _in_flight_during(log, "combine_a2a_bwd", 0, "shared_bwd 1"):
        bad.append("the second half's shared-expert backward does not overlap combine grad 0")
    for c in range(C - 1):  # the next chunk's output grad flies during this chunk's backward
        if not _in_flight_during(log, "combine_a2a_bwd", c + 1, f"experts_bwd {c}"):
            bad.append(f"combine grad {c + 1} not in flight during experts_bwd {c}")
    for c in range(1, C):  # the previous chunk's input grad flies during this chunk's backward
        if not _in_flight_during(log, "dispatch_a2a_bwd", c - 1, f"experts_bwd {c}"):
            bad.append(f"dispatch grad {c - 1} not in flight during experts_bwd {c}")
    return bad


def drain_violations(log: list[str]) -> list[str]:
    """Every queued dW runs while an exchange is in flight, the window of one issue..wait."""
    bad, flying = [], set()
    for e in log:
        if e.startswith("issue "):
            flying.add(e.removeprefix("issue "))
        elif e.startswith("waited "):
            flying.discard(e.removeprefix("waited "))
        elif e == "dW" and not flying:
            bad.append("a dW task ran with no exchange in flight")
    if "dW" not in log:
        bad.append("no dW task ran in an exchange window")
    if "dW_flush" in log:
        bad.append(f"{log.count('dW_flush')} dW tasks were left for the flush point")
    for c in range(1, C):  # chunk c-1's expert dW fills a window before chunk c's backward
        a, b = log.index(f"experts_bwd {c - 1}"), log.index(f"experts_bwd {c}")
        if "dW" not in log[a:b]:
            bad.append(f"no dW drained between experts_bwd {c - 1} and experts_bwd {c}")
    for c in range(1, C):  # ... and chunk c's backward leaves dW for dispatch grad c-1's window
        a, b = log.index(f"experts_bwd {c}"), log.index(f"waited dispatch_a2a_bwd {c - 1}")
        if "dW" not in log[a:b]:
            bad.append(f"no dW drained in the window of dispatch grad {c - 1}")
    return bad


@pytest.mark.parametrize("split_dw", [False, True])
def test_chunked_exchanges_stay_in_flight_while_the_next_compute_runs(split_dw):
    log, got, ref = _record(split_dw)
    assert _max_rel(got, ref) < 1e-5  # the fake moves rows faithfully: the plain path's numbers
    assert forward_violations(log, split_dw) == [], log
    assert backward_violations(log, split_dw) == [], log
    assert log.count("shared 0") == 1 and log.count("shared 1") == split_dw, log


def test_split_dw_runs_queued_weight_grads_inside_exchange_windows():
    log, _, _ = _record(split_dw=True)
    assert drain_violations(log) == [], log


def test_checks_fail_when_each_exchange_is_waited_right_after_issue():
    log, got, ref = _record(split_dw=True, serialize=True)
    assert _max_rel(got, ref) < 1e-5  # serialized: the same numbers, no overlap
    fwd, bwd = forward_violations(log, True), backward_violations(log, True)
    drain = drain_violations(log)
    assert len(fwd) == 2 + 3 * (C - 1), fwd  # every forward check fails
    assert len(bwd) == 2 + 2 * (C - 1), bwd
    assert "no dW task ran in an exchange window" in drain and any("flush" in b for b in drain)
