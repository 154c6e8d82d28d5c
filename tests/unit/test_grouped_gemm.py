"""Grouped expert GEMMs equal the per-expert loop (outputs and grads), also with deferred dW."""

import pytest
import torch

from braid.moe.experts import GroupedExperts
from braid.ops.grouped_gemm import counts_to_offsets, gmm, grouped_linear

COUNTS = [[3, 0, 5, 1], [0, 0, 0, 7], [2, 2, 2, 2]]


@pytest.mark.parametrize("counts", COUNTS)
def test_grouped_mm_matches_loop_and_naive(counts):
    torch.manual_seed(0)
    c = torch.tensor(counts)
    x, w = torch.randn(int(c.sum()), 16), torch.randn(4, 16, 8)
    offs = counts_to_offsets(c)
    y_g, y_l = gmm(x, w, offs, "grouped"), gmm(x, w, offs, "loop")
    naive = torch.cat(
        [
            x[a:b] @ w[e]
            for e, (a, b) in enumerate(zip([0] + offs[:-1].tolist(), offs.tolist(), strict=True))
        ]
    )
    torch.testing.assert_close(y_g, naive)
    torch.testing.assert_close(y_l, naive)


@pytest.mark.parametrize("counts", COUNTS)
def test_grouped_experts_equal_loop_outputs_and_grads(counts):
    torch.manual_seed(1)
    c = torch.tensor(counts)
    results = {}
    for impl in ("grouped", "loop"):
        torch.manual_seed(2)
        ex = GroupedExperts(4, 16, 24, impl)
        ex.w13.data.normal_(0, 0.2)
        ex.w2.data.normal_(0, 0.2)
        x = torch.randn(int(c.sum()), 16, generator=torch.Generator().manual_seed(3))
        x.requires_grad_()
        y = ex(x, c)
        y.backward(torch.ones_like(y) * 0.5)  # an expanded-looking grad made contiguous inside
        results[impl] = (y.detach(), x.grad, ex.w13.grad, ex.w2.grad)
    for a, b in zip(results["grouped"], results["loop"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_deferred_weight_grad_runs_later_with_identical_result():
    torch.manual_seed(4)
    c = torch.tensor([4, 0, 3])
    offs = counts_to_offsets(c)
    x = torch.randn(7, 8, requires_grad=True)
    w = torch.randn(3, 8, 8, requires_grad=True)
    grouped_linear(x, w, offs).square().sum().backward()
    ref_dx, ref_dw = x.grad.clone(), w.grad.clone()

    x.grad, w.grad = None, None
    queue = []
    grouped_linear(x, w, offs, wgrad_sink=queue.append).square().sum().backward()
    assert w.grad is None and len(queue) == 1  # dX is done, dW waits in the queue
    torch.testing.assert_close(x.grad, ref_dx)
    queue.pop()()
    torch.testing.assert_close(w.grad, ref_dw)


def test_compiled_experts_match_eager_in_fp32():
    """torch.compile traces grouped_mm's meta kernel, which takes bf16 only: fp32 must still
    compile (through the loop) and give the eager outputs and grads."""
    torch.manual_seed(0)
    experts = GroupedExperts(4, 16, 8)
    with torch.no_grad():
        experts.w13.normal_(std=0.1)
        experts.w2.normal_(std=0.1)
    counts = torch.tensor([3, 0, 5, 1])
    x = torch.randn(9, 16)
    results = []
    for fn in (experts, torch.compile(experts, backend="aot_eager", fullgraph=False)):
        xi = x.clone().requires_grad_(True)
        experts.zero_grad(set_to_none=True)
        fn(xi, counts).square().sum().backward()
        results.append((xi.grad, experts.w13.grad.clone(), experts.w2.grad.clone()))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("divide", [1.0, 3.0])
def test_accumulate_grad_adds_low_precision_dw_bitwise_as_its_cast_copy(divide):
    from braid.ops.grouped_gemm import accumulate_grad

    g = torch.Generator().manual_seed(9)
    dws = [torch.randn(4, 8, 6, generator=g).bfloat16() for _ in range(3)]
    # fp32 grad, bf16 dW: added as it is; bf16 grad, fp32 dW: cast first (the old rule)
    for w_dtype, dw_dtype in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)):
        w = torch.nn.Parameter(torch.randn(4, 8, 6, generator=g).to(w_dtype))
        want = None
        for dw in dws:  # the old rule: a copy of dW in the grad's dtype, divided, then added
            d = dw.to(dw_dtype).to(w_dtype).div_(divide)
            want = d if want is None else want.add_(d)
        for dw in dws:
            accumulate_grad(w, dw.to(dw_dtype), divide)
        assert w.grad.dtype == w_dtype and torch.equal(w.grad, want), (w_dtype, divide)


def test_shared_casts_check_the_weight_not_just_its_id():
    from braid.ops.grouped_gemm import cast_weight

    w1, w2 = torch.randn(2, 3), torch.randn(2, 3)
    casts = {(id(w2), torch.bfloat16): (w1, "a stale cast of another weight")}
    got = cast_weight(w2, torch.bfloat16, casts)
    assert torch.equal(got, w2.bfloat16()) and cast_weight(w2, torch.bfloat16, casts) is got


def test_shared_casts_blocks_nest():
    ex = GroupedExperts(2, 4, 6)
    with ex.shared_casts():
        outer = ex._casts
        with ex.shared_casts():
            assert ex._casts is outer  # the inner block shares the outer one's casts
        assert ex._casts is outer
    assert ex._casts is None


def test_without_the_kernel_a_wide_dw_is_the_cast_of_the_gemm_s_own():
    """Off a GPU with Triton (here: the CPU) nothing is written wide: `wide_dtype` is None, and
    a dW asked for in fp32 is the bf16 GEMM's result cast, bit for bit."""
    from braid.ops.grouped_gemm import gmm_wgrad, wide_dtype

    torch.manual_seed(5)
    x, g = torch.randn(24, 16).bfloat16(), torch.randn(24, 32).bfloat16()
    offs = counts_to_offsets(torch.tensor([10, 0, 14]))
    w = torch.zeros(3, 16, 32, requires_grad=True)
    assert wide_dtype(w, x, g, "grouped") is None
    for impl in ("grouped", "loop"):
        got = gmm_wgrad(x, g, offs, impl, torch.float32)
        assert got.dtype == torch.float32
        assert torch.equal(got, gmm_wgrad(x, g, offs, impl).float())
