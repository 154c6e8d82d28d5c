"""The fused fp8 SwiGLU experts (braid.ops.fp8_experts) against the unfused composition they
replace: fp8 grouped GEMM (w13) -> SwiGLU -> fp8 grouped GEMM (w2), the same recipe. In CPU
emulation the SwiGLU of the composition uses the same fp32 formulas, so outputs and every
gradient must agree bit for bit, with dW in bf16-style (dequantised codes) or fp8, computed
at once or deferred through a wgrad sink, and from rows quantised before an exchange."""

import pytest
import torch

from braid.moe.experts import GroupedExperts
from braid.ops import fp8
from braid.ops.fp8_experts import fp8_swiglu_experts
from braid.ops.fp8_gemm import fp8_grouped_linear
from braid.ops.fp8_stats import Fp8Stats
from braid.ops.grouped_gemm import counts_to_offsets
from braid.ops.swiglu import swiglu_backward_math, swiglu_forward_math

COUNTS = [[5, 0, 17, 1], [0, 0, 0, 9], [40, 0, 25, 63]]


class _MathSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return swiglu_forward_math(h)

    @staticmethod
    def backward(ctx, dy):
        (h,) = ctx.saved_tensors
        return swiglu_backward_math(h, dy)


def composition(x, w13, w2, offs, **kw):
    h = fp8_grouped_linear(x, w13, offs, **kw)
    return fp8_grouped_linear(_MathSwiGLU.apply(h), w2, offs, **kw)


def data(counts, D=32, F=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), D, generator=g) * torch.logspace(-2, 1, D)
    w13 = torch.randn(len(counts), D, 2 * F, generator=g) * 0.2
    w2 = torch.randn(len(counts), F, D, generator=g) * 0.2
    gy = torch.randn(sum(counts), D, generator=g)
    return x, w13, w2, gy


def run(fn, x, w13, w2, gy, offs, sink: bool, **kw):
    x, w13, w2 = (t.detach().clone().requires_grad_() for t in (x, w13, w2))
    queue = []
    y = fn(x, w13, w2, offs, wgrad_sink=queue.append if sink else None, **kw)
    y.backward(gy)
    assert (len(queue) == 2) == sink
    for task in queue:
        task()
    return y, x.grad, w13.grad, w2.grad


@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("dw8", [False, True])
@pytest.mark.parametrize("sink", [False, True])
def test_fused_equals_composition_bitwise(counts, dw8, sink):
    x, w13, w2, gy = data(counts)
    offs = counts_to_offsets(torch.tensor(counts))
    got = run(fp8_swiglu_experts, x, w13, w2, gy, offs, sink, fp8_wgrad=dw8)
    want = run(composition, x, w13, w2, gy, offs, sink, fp8_wgrad=dw8)
    for what, a, b in zip(("y", "dx", "dw13", "dw2"), got, want, strict=True):
        assert torch.equal(a, b), what


def test_prequantised_rows_and_stats():
    counts = [7, 3, 0, 22]
    x, w13, w2, gy = data(counts, seed=1)
    offs = counts_to_offsets(torch.tensor(counts))
    q, s = fp8.quantize(x)
    w13, w2 = w13.requires_grad_(), w2.requires_grad_()
    anchor = torch.zeros(()).expand(x.shape).requires_grad_()
    stats = Fp8Stats()
    stats.active = True
    y = fp8_swiglu_experts(anchor, w13, w2, offs, pre=(q, s), stats=stats, name="e")
    y.backward(gy)
    ref = run(composition, x, w13, w2, gy, offs, sink=False)
    assert torch.equal(y, ref[0]) and torch.equal(anchor.grad, ref[1])
    assert torch.equal(w13.grad, ref[2]) and torch.equal(w2.grad, ref[3])
    got = stats.read()  # rows arrived quantised: no w13/x entry; the rest recorded
    assert sorted(k.rsplit("/", 1)[0] for k in got if k.endswith("amax")) == [
        "fp8/e.w13/grad",
        "fp8/e.w2/grad",
        "fp8/e.w2/x",
    ]
    assert got["fp8/e.w2/grad/amax"] == pytest.approx(gy.abs().max().item())


def test_module_uses_the_fused_path_and_skips_frozen_weights():
    counts = torch.tensor([9, 0, 14, 5])
    ex = GroupedExperts(4, 32, 24)
    torch.nn.init.normal_(ex.w13, 0, 0.2), torch.nn.init.normal_(ex.w2, 0, 0.2)
    ex.fp8_stats = Fp8Stats()
    x, _, _, gy = data(counts.tolist(), seed=2)
    ex.w2.requires_grad_(False)
    xg = x.clone().requires_grad_()
    ex(xg, counts).backward(gy)
    assert ex.w2.grad is None and ex.w13.grad is not None
    ref = run(composition, x, ex.w13, ex.w2, gy, counts_to_offsets(counts), sink=False)
    assert torch.equal(xg.grad, ref[1]) and torch.equal(ex.w13.grad, ref[2])


def test_backward_gives_back_h_and_works_under_activation_checkpointing(monkeypatch):
    """h [R, 2F] is released as soon as the SwiGLU backward has read it (as the unfused
    composition's SwiGLU node did), and the Function recomputes correctly under
    non-reentrant activation checkpointing (the saved h is then the recomputed one)."""
    from torch.utils.checkpoint import checkpoint

    from braid.ops import fp8_experts

    counts = [6, 0, 11, 3]
    x, w13, w2, gy = data(counts, seed=3)
    offs = counts_to_offsets(torch.tensor(counts))
    seen = []
    real = fp8_experts.swiglu_backward_quantize

    def spy(h, dy):
        seen.append(h)
        return real(h, dy)

    monkeypatch.setattr(fp8_experts, "swiglu_backward_quantize", spy)
    want = run(fp8_swiglu_experts, x, w13, w2, gy, offs, sink=False)
    assert len(seen) == 1 and seen[0].untyped_storage().nbytes() == 0

    def ckpt(x, w13, w2, offs, wgrad_sink=None):
        return checkpoint(fp8_swiglu_experts, x, w13, w2, offs, use_reentrant=False)

    got = run(ckpt, x, w13, w2, gy, offs, sink=False)
    for what, a, b in zip(("y", "dx", "dw13", "dw2"), got, want, strict=True):
        assert torch.equal(a, b), what
