"""Receiving into a caller's buffer (`move_into` / `combine_into`, one process): the wrappers
(compression, `auto`) over an exchange without them, in-place receipt where an exchange
promises it, and the pipeline's chunks of experts receiving every chunk into one buffer."""

from __future__ import annotations

import copy

import pytest
import torch

from braid.exchange.auto import AutoChoice, AutoExchange
from braid.exchange.base import Done
from braid.exchange.compress import with_compressor
from braid.exchange.config import ExchangeConfig
from braid.model.config import ModelConfig
from braid.moe.config import MoEConfig
from braid.moe.layer import MoE
from braid.overlap.engine import LayerOverlap
from braid.overlap.streams import Clock

CPU = Clock(torch.device("cpu"))


class Bare:
    """A one-rank exchange written without the `Exchange` base (duck-typed): no `*_into`."""

    size, rank = 1, 0

    def exchange_counts(self, send_counts_WL):
        return send_counts_WL.clone()

    def move(self, x_RD, send_splits, recv_splits):
        return Done(x_RD.clone())

    def dispatch(self, x_RD, send_splits, recv_splits):
        return self.move(x_RD, send_splits, recv_splits)

    def combine(self, y_RD, send_splits, recv_splits):
        return self.move(y_RD, send_splits, recv_splits)

    def all_reduce_sum(self, t):
        return t.detach().clone()


def _moe() -> MoE:
    moe = MoE(ModelConfig(dim=16), MoEConfig(num_experts=4, top_k=2, expert_hidden=12))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return moe


def _run(moe: MoE, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_()
    y, _ = moe(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    if moe.overlap is not None:
        moe.overlap.flush()
    return [y.detach(), x.grad] + [p.grad for p in moe.parameters()]


def _auto_over(chosen) -> AutoExchange:
    """An `auto` whose choice is already `chosen` (no process group: it only delegates)."""
    auto = AutoExchange.__new__(AutoExchange)
    auto.size, auto.rank, auto._watchers = 1, 0, []
    auto.choice = AutoChoice("bare", {"bare": 1.0}, {}, 1, 1, torch.float32, chosen)
    return auto


@pytest.mark.parametrize("wrap", ["int8", "int8+combine", "auto"])
def test_wrappers_receive_into_for_an_exchange_without_into(wrap):
    """A duck-typed exchange (the dispatcher copies its rows into the buffer) under the
    compression wrapper or `auto`: the chunks of experts run, and give the plain path's
    numbers with the same exchange."""
    if wrap == "auto":
        exchange = _auto_over(Bare())
    else:
        cfg = ExchangeConfig(compressor="int8", compress_combine=wrap.endswith("combine"))
        exchange = with_compressor(Bare(), cfg)
    base = _moe()
    base.dispatcher.exchange = exchange
    x = torch.randn(29, 16, generator=torch.Generator().manual_seed(1))
    want = _run(copy.deepcopy(base), x)
    moe = copy.deepcopy(base)
    moe.overlap = LayerOverlap(0, 2, True, CPU, chunk_by="experts")
    got = _run(moe, x)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    rows = torch.randn(5, 3)
    for op in ("move_into", "combine_into"):
        buf = torch.full((7, 3), 7.0)
        h = getattr(exchange, op)(rows, [5], [5], buf[1:6])
        assert h.wait().data_ptr() == buf[1:6].data_ptr()
        if op == "combine_into" and wrap == "int8+combine":
            torch.testing.assert_close(buf[1:6], rows, rtol=0, atol=float(rows.abs().max()) / 100)
        else:
            assert torch.equal(buf[1:6], rows)
        assert buf[0].eq(7).all() and buf[6].eq(7).all()


def test_simulated_receives_in_place_before_wait():
    """`simulated` writes the rows into `out` as the movement itself (not a copy at `wait()`):
    they are there while the movement is still in flight."""
    from braid.exchange.simulated import SimulatedExchange

    ex = SimulatedExchange(cfg=ExchangeConfig(algorithm="simulated", simulate_latency_us=1e5))
    x = torch.randn(6, 3)
    buf = torch.full((8, 3), 7.0)
    for op in (ex.move_into, ex.combine_into):
        buf[1:7] = 7.0
        h = op(x, [6], [6], buf[1:7])
        assert not h.done()  # 100 ms in flight
        assert torch.equal(buf[1:7], x)
        assert h.wait().data_ptr() == buf[1:7].data_ptr()


def test_chunks_of_experts_receive_every_chunk_into_one_buffer():
    """Forward combines and backward dispatch-grads of every chunk are received into
    consecutive rows of one buffer each (no concatenation), covering all of it in chunk order;
    chunks of tokens receive nothing into a buffer. Both equal the plain path."""
    from braid.exchange.simulated import SimulatedExchange

    class Spy(SimulatedExchange):
        def __init__(self):
            # One rank's traffic: its chunks of experts may divide all the layer's experts.
            cfg = ExchangeConfig(algorithm="simulated", simulate_latency_us=1.0, simulate_ranks=1)
            super().__init__(cfg=cfg)
            self.outs: list[torch.Tensor] = []

        def move_into(self, x_RD, send_splits, recv_splits, out):
            self.outs.append(out)
            return super().move_into(x_RD, send_splits, recv_splits, out)

    base = _moe()
    x = torch.randn(29, 16, generator=torch.Generator().manual_seed(2))
    want = _run(copy.deepcopy(base), x)
    for by, chunks in (("experts", 2), ("experts", 4), ("tokens", 3)):
        moe = copy.deepcopy(base)
        moe.dispatcher.exchange = spy = Spy()
        moe.overlap = LayerOverlap(0, chunks, True, CPU, chunk_by=by)
        got = _run(moe, x)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        if by == "tokens":
            assert spy.outs == []
            continue
        assert len(spy.outs) == 2 * chunks  # forward's combines, then backward's
        for outs in (spy.outs[:chunks], spy.outs[chunks:]):
            home = outs[0]._base
            assert home is not None and all(o._base is home for o in outs)
            starts = [o.storage_offset() // home.shape[1] for o in outs]
            ends = [s + o.shape[0] for s, o in zip(starts, outs, strict=True)]
            assert starts == [0] + ends[:-1] and ends[-1] == home.shape[0] == 29 * 2
        assert spy.outs[0]._base is not spy.outs[chunks]._base
