"""Parts of the experts (a pipeline chunk of experts, `braid.overlap`): which experts each
chunk holds (`expert_bounds`), and a part's GEMMs and dW (`grouped_linear(..., part=)`,
`accumulate_grad`) against per-expert references."""

from __future__ import annotations

import pytest
import torch

from braid.ops.grouped_gemm import accumulate_grad, counts_to_offsets, grouped_linear
from braid.ops.permute import expert_bounds

# -- expert_bounds --------------------------------------------------------------------------


def _check_cover(bounds: list[tuple[int, int]], L: int, C: int) -> list[int]:
    assert len(bounds) == C and bounds[0][0] == 0 and bounds[-1][1] == L, bounds
    for (_, hi), (lo, _) in zip(bounds[:-1], bounds[1:], strict=True):
        assert hi == lo, bounds  # contiguous
    sizes = [hi - lo for lo, hi in bounds]
    assert min(sizes) >= 1, bounds  # none empty
    return sizes


@pytest.mark.parametrize("L", [1, 2, 3, 4, 5, 7, 8, 12, 16, 31, 32, 64, 100])
def test_expert_bounds_cover_the_experts_in_nonempty_slices_with_short_ends(L):
    for C in range(1, L + 1):
        sizes = _check_cover(expert_bounds(L, C), L, C)
        if C < 3:  # no middle: equal slices, within rounding
            assert max(sizes) - min(sizes) <= 1, (L, C, sizes)
        elif L >= 4 * C:  # weights 1, 2, ..., 2, 1: every boundary rounded once
            middle = L / (C - 1)  # (2C - 2 halves in all)
            for s in sizes[1:-1]:
                assert abs(s - middle) <= 1, (L, C, sizes)
            for s in (sizes[0], sizes[-1]):
                assert abs(s - middle / 2) <= 1, (L, C, sizes)
                assert s < min(sizes[1:-1]), (L, C, sizes)


def test_expert_bounds_known_values():
    assert expert_bounds(4, 1) == [(0, 4)]
    assert expert_bounds(4, 2) == [(0, 2), (2, 4)]
    assert expert_bounds(4, 3) == [(0, 1), (1, 3), (3, 4)]
    assert expert_bounds(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert expert_bounds(8, 4) == [(0, 1), (1, 4), (4, 7), (7, 8)]  # 8 * (1, 3, 5, 6) / 6
    assert expert_bounds(16, 5) == [(0, 2), (2, 6), (6, 10), (10, 14), (14, 16)]


@pytest.mark.parametrize("L,C", [(1, 2), (4, 5), (3, 8), (0, 1)])
def test_expert_bounds_refuse_more_chunks_than_experts(L, C):
    with pytest.raises(ValueError, match=f"{C} chunks > {L} experts"):
        expert_bounds(L, C)


# -- dW of a part of the experts --------------------------------------------------------------


def _rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_accumulate_part_without_grad_writes_zeros_elsewhere_and_dw_exactly():
    w = torch.nn.Parameter(_rand(5, 3, 4))
    dw = _rand(2, 3, 4, dtype=torch.bfloat16, seed=1)
    accumulate_grad(w, dw, 1.0, (1, 3))
    assert w.grad.dtype == torch.float32 and w.grad.shape == w.shape
    assert torch.equal(w.grad[1:3], dw.float())
    assert not w.grad[:1].any() and not w.grad[3:].any()


def test_accumulate_part_adds_bf16_dw_into_fp32_grad_bitwise():
    w = torch.nn.Parameter(_rand(5, 3, 4))
    g0 = _rand(5, 3, 4, seed=2)
    w.grad = g0.clone()
    dw = _rand(3, 3, 4, dtype=torch.bfloat16, seed=3)
    accumulate_grad(w, dw, 1.0, (2, 5))
    want = g0.clone()
    want[2:5] = g0[2:5] + dw.float()
    assert torch.equal(w.grad, want)
    accumulate_grad(w, dw, 1.0, (0, 3))  # a second part adds on top, rows 0-2 only
    want[0:3] += dw.float()
    assert torch.equal(w.grad, want)


@pytest.mark.parametrize("divide", [1.0, 3.0])
def test_covering_parts_write_a_new_grad_then_later_passes_add(divide):
    """Parts that cover the weight (the pipeline's chunks of experts: (lo, hi, True)) write
    their rows of a new grad instead of adding into zeros; once whole, the next pass (another
    micro-batch) adds. Bitwise the zeros-then-add reference, both passes."""
    w = torch.nn.Parameter(_rand(6, 3, 4))
    ref = torch.nn.Parameter(w.detach().clone())
    bounds = [(0, 1), (1, 4), (4, 6)]
    for step in range(2):
        for i, (lo, hi) in enumerate(bounds):
            dw = _rand(hi - lo, 3, 4, dtype=torch.bfloat16, seed=10 * step + i)
            accumulate_grad(w, dw.clone(), divide, (lo, hi, True))
            accumulate_grad(ref, dw.clone(), divide, (lo, hi))  # zeros, then adds
            if step == 0 and i < len(bounds) - 1:
                assert w.grad._braid_written == bounds[: i + 1]  # not whole yet
        assert not hasattr(w.grad, "_braid_written")  # whole: the next pass adds
        assert torch.equal(w.grad, ref.grad), step


def test_covering_part_written_twice_in_one_pass_adds():
    """A covering part whose rows were already written in this pass adds (never overwrites)."""
    w = torch.nn.Parameter(_rand(4, 2, 2))
    a, b = _rand(2, 2, 2, seed=1), _rand(2, 2, 2, seed=2)
    accumulate_grad(w, a, 1.0, (0, 2, True))
    accumulate_grad(w, b, 1.0, (0, 2, True))
    assert torch.equal(w.grad[0:2], a + b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("had_grad", [False, True])
def test_accumulate_part_with_a_divide_casts_then_divides_then_adds(dtype, had_grad):
    w = torch.nn.Parameter(_rand(4, 2, 3))
    g0 = _rand(4, 2, 3, seed=4) if had_grad else torch.zeros(4, 2, 3)
    if had_grad:
        w.grad = g0.clone()
    dw = _rand(2, 2, 3, dtype=dtype, seed=5)
    accumulate_grad(w, dw.clone(), 3.0, (1, 3))
    want = g0.clone()
    want[1:3] = g0[1:3] + dw.float() / 3.0
    assert torch.equal(w.grad, want)


def _grouped_case(impl: str):
    E, D, F, part = 5, 8, 16, (1, 4)
    counts = torch.tensor([3, 0, 4])  # experts 1, 2, 3 of the weight; expert 2 has no rows
    x = _rand(int(counts.sum()), D, seed=6).requires_grad_()
    w = torch.nn.Parameter(_rand(E, D, F, seed=7) * 0.3)
    g = _rand(int(counts.sum()), F, seed=8)
    # reference: one matmul per expert, autograd's own dW
    x_ref = x.detach().clone().requires_grad_()
    w_ref = torch.nn.Parameter(w.detach().clone())
    ends = torch.cumsum(counts, 0).tolist()
    rows = zip([0] + ends[:-1], ends, strict=True)
    y_ref = torch.cat([x_ref[a:b] @ w_ref[part[0] + e] for e, (a, b) in enumerate(rows)])
    (y_ref * g).sum().backward()
    return x, w, g, counts, part, impl, (y_ref.detach(), x_ref.grad, w_ref.grad)


@pytest.mark.parametrize("impl", ["grouped", "loop"])
@pytest.mark.parametrize("deferred", [False, True])
@pytest.mark.parametrize("divide", [1.0, 4.0])
def test_grouped_linear_part_uses_its_experts_and_writes_only_their_grad_rows(
    impl, deferred, divide
):
    x, w, g, counts, (lo, hi), impl, (y_ref, dx_ref, dw_ref) = _grouped_case(impl)
    tasks: list = []
    sink = tasks.append if deferred else None
    y = grouped_linear(x, w, counts_to_offsets(counts), impl, sink, divide, None, (lo, hi))
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    (y * g).sum().backward()
    torch.testing.assert_close(x.grad, dx_ref, rtol=1e-6, atol=1e-6)
    if deferred:
        assert w.grad is None and len(tasks) == 1  # nothing until the task runs
        tasks.pop()()
    assert w.grad.shape == w.shape
    assert not w.grad[:lo].any() and not w.grad[hi:].any()
    assert not w.grad[2].any()  # expert 2 had no rows
    torch.testing.assert_close(w.grad, dw_ref / divide, rtol=1e-6, atol=1e-6)
    assert not dw_ref[:lo].any() and not dw_ref[hi:].any()  # (the reference agrees)


def test_grouped_linear_parts_of_one_weight_add_up_to_the_whole_dw():
    """Two parts of one weight, each its own call and backward (two chunks of experts): the
    grad is the one call's over all experts, with the calls' rows split by expert."""
    E, D, F = 4, 8, 16
    counts = torch.tensor([2, 3, 1, 4])
    x = _rand(10, D, seed=9)
    w = torch.nn.Parameter(_rand(E, D, F, seed=10))
    g = _rand(10, F, seed=11)
    (grouped_linear(x, w, counts_to_offsets(counts)) * g).sum().backward()
    whole = w.grad.clone()
    w.grad = None
    for (lo, hi), (a, b) in zip([(0, 1), (1, 4)], [(0, 2), (2, 10)], strict=True):
        offs = counts_to_offsets(counts[lo:hi])
        (grouped_linear(x[a:b], w, offs, part=(lo, hi)) * g[a:b]).sum().backward()
    torch.testing.assert_close(w.grad, whole, rtol=1e-6, atol=1e-6)
