"""The dW queue: FIFO flushes, drains only while an exchange is in flight, flush points empty it
during backward, and split-dW linears give the plain gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from braid.exchange.base import Done, Handle
from braid.model.config import ModelConfig
from braid.model.init import init_weights
from braid.model.layers import SwiGLU
from braid.model.transformer import Transformer
from braid.moe.config import MoEConfig
from braid.overlap.engine import LayerOverlap
from braid.overlap.streams import Clock
from braid.overlap.wgrad import (
    JoinedWgrad,
    WgradQueue,
    flush_point,
    split_linear,
    swiglu_split_dw,
)


class FakeHandle(Handle):
    """An exchange that completes after `polls` calls of done()."""

    def __init__(self, polls: int):
        self.polls = polls

    def done(self) -> bool:
        self.polls -= 1
        return self.polls < 0

    def wait(self) -> torch.Tensor:
        return torch.zeros(0)


def test_flush_runs_tasks_in_queue_order_and_empties_the_queue():
    q, ran = WgradQueue(), []
    for i in range(5):
        q(lambda i=i: ran.append(i))
    assert len(q) == 5 and ran == []
    assert q.flush() == 5
    assert ran == [0, 1, 2, 3, 4] and len(q) == 0 and q.num_run == 5
    assert q.flush() == 0


def test_drain_runs_tasks_only_while_the_exchange_is_in_flight():
    q, ran = WgradQueue(), []
    for i in range(5):
        q(lambda i=i: ran.append(i))
    assert q.drain(FakeHandle(polls=2)) == 2  # two polls say "in flight", then done
    assert ran == [0, 1] and len(q) == 3
    assert q.drain(Done(torch.zeros(0))) == 0  # a completed movement has no window
    assert q.num_drained == 2
    q.flush()
    assert ran == [0, 1, 2, 3, 4]


def test_flush_point_flushes_before_the_gradient_passes_through():
    q, order = WgradQueue(), []
    x = torch.randn(3, requires_grad=True)
    y = flush_point(x, q)
    q(lambda: order.append("dW"))
    y.register_hook(lambda g: order.append("grad reaches flush point"))
    x.register_hook(lambda g: order.append("grad leaves flush point"))
    y.sum().backward()
    assert order == ["grad reaches flush point", "dW", "grad leaves flush point"]
    assert len(q) == 0


@pytest.mark.parametrize("shape", [(5, 8), (2, 3, 8)])
def test_split_linear_matches_linear_once_flushed(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(6, 8, requires_grad=True)
    torch.nn.functional.linear(x, w).sin().sum().backward()
    ref_dx, ref_dw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    q = WgradQueue()
    split_linear(x, w, q).sin().sum().backward()
    assert w.grad is None and len(q) == 1  # dX done, dW waiting
    torch.testing.assert_close(x.grad, ref_dx)
    q.flush()
    torch.testing.assert_close(w.grad, ref_dw)


def test_swiglu_split_dw_matches_the_module_and_accumulates_over_micro_batches():
    torch.manual_seed(1)
    ffn, x = SwiGLU(8, 12), torch.randn(4, 8)
    for _ in range(2):  # two micro-batches: grads add up
        ffn(x).square().sum().backward()
    ref = [p.grad.clone() for p in ffn.parameters()]
    ffn.zero_grad(set_to_none=True)
    q = WgradQueue()
    for _ in range(2):
        swiglu_split_dw(ffn, x, q).square().sum().backward()
        q.flush()
    for p, r in zip(ffn.parameters(), ref, strict=True):
        torch.testing.assert_close(p.grad, r)


def test_nothing_is_left_queued_after_backward_and_grads_match_plain():
    mc = ModelConfig(dim=32, n_layers=3, n_heads=2, vocab_size=64, ffn_hidden=64, max_seq_len=32)
    base = Transformer(
        mc, MoEConfig(num_experts=4, top_k=2, expert_hidden=16, num_shared_experts=1)
    )
    init_weights(base, 0, 0.02, 3)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))

    def grads(model, checkpointing: bool):
        for b in model.blocks:
            b.activation_checkpoint = checkpointing
        out = model(idx)
        (out.logits.square().mean() + out.aux_loss).backward()
        return [p.grad for p in model.parameters()]

    ref = grads(copy.deepcopy(base), False)
    for checkpointing in (False, True):
        model = copy.deepcopy(base)
        layers = model.moe_modules()
        for i, moe in layers.items():
            moe.overlap = LayerOverlap(i, 2, True, Clock(torch.device("cpu")))
        got = grads(model, checkpointing)
        assert all(len(m.overlap.queue) == 0 for m in layers.values())
        assert all(m.overlap.queue.num_run > 0 for m in layers.values())
        for g, r in zip(got, ref, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rows", [0, 3])
def test_joined_wgrad_of_two_row_blocks_is_the_one_gemm_over_all_rows(rows):
    """A SwiGLU run in two row blocks (the pipeline's shared-expert halves; the first may be
    empty) through `JoinedWgrad`: once both blocks' backward ran, one task per weight, whose
    dW equals the unsplit module's bit for bit, even into bf16 parameters, where adding the two
    blocks' dW would round twice."""
    torch.manual_seed(0)
    ffn = SwiGLU(16, 24).to(torch.bfloat16)
    x = torch.randn(7, 16, dtype=torch.bfloat16)
    ref = copy.deepcopy(ffn)
    ref(x).float().square().sum().backward()

    q = WgradQueue()
    joined = JoinedWgrad(q, 2)
    parts = [swiglu_split_dw(ffn, x[:rows], joined.block(0))]
    parts.append(swiglu_split_dw(ffn, x[rows:], joined.block(1)))
    torch.cat(parts).float().square().sum().backward()
    assert len(q) == 2  # one task for w2, one for w13: the blocks joined
    q.flush()
    for name in ("w13", "w2"):
        got, want = getattr(ffn, name).weight.grad, getattr(ref, name).weight.grad
        assert got.dtype == torch.bfloat16 and torch.equal(got, want), name

    naive = copy.deepcopy(ffn)  # the control: each block's dW added into the bf16 grad
    for p in naive.parameters():
        p.grad = None
    q2 = WgradQueue()
    two = [swiglu_split_dw(naive, x[:rows], q2), swiglu_split_dw(naive, x[rows:], q2)]
    torch.cat(two).float().square().sum().backward()
    q2.flush()
    if rows:
        assert not torch.equal(naive.w13.weight.grad, ref.w13.weight.grad)
