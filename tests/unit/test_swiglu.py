"""The lean SwiGLU Function equals autograd's unfused expression bit for bit (value and grad)."""

import pytest
import torch
import torch.nn.functional as F

from braid.ops.swiglu import swiglu, swiglu_backward_math, swiglu_forward_math


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_unfused_autograd_exactly(dtype):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 48, generator=g).to(dtype).requires_grad_(True)
    dy = torch.randn(37, 24, generator=g).to(dtype)
    gate, up = h.chunk(2, dim=-1)
    want = F.silu(gate) * up
    want.backward(dy)
    want_grad, h.grad = h.grad, None
    got = swiglu(h)
    got.backward(dy)
    assert torch.equal(got, want) and torch.equal(h.grad, want_grad)


def test_swiglu_traced_off_cuda_is_the_unfused_expression():
    """Under torch.compile off CUDA `swiglu` traces the plain expression: silu of the first
    half (gate) times the second (up), value and grad."""
    g = torch.Generator().manual_seed(7)
    h = torch.randn(9, 16, generator=g, requires_grad=True)
    dy = torch.randn(9, 8, generator=g)
    ref = h.detach().clone().requires_grad_(True)
    gate, up = ref.chunk(2, dim=-1)
    want = F.silu(gate) * up
    want.backward(dy)
    got = torch.compile(swiglu, backend="aot_eager")(h)
    got.backward(dy)
    torch.testing.assert_close(got, want.detach())
    torch.testing.assert_close(h.grad, ref.grad)


def test_swiglu_saves_only_its_input():
    h = torch.randn(8, 6, requires_grad=True)
    y = swiglu(h)
    assert [t.data_ptr() for t in y.grad_fn.saved_tensors] == [h.data_ptr()]


def _reference_fp64(h, dy):
    hd = h.detach().double().requires_grad_(True)
    gate, up = hd.chunk(2, dim=-1)
    y = F.silu(gate) * up
    y.backward(dy.double())
    return y, hd.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pass_math_matches_reference_and_is_no_less_accurate(dtype):
    """The formulas the fused kernels compile, eagerly, against the reference Function and an
    fp64 truth: fp32 within 1e-6, bf16 within one rounding and never further from the truth."""
    g = torch.Generator().manual_seed(1)
    h = (torch.randn(53, 64, generator=g) * 3).to(dtype)
    dy = torch.randn(53, 32, generator=g).to(dtype)
    ref_h = h.clone().requires_grad_(True)
    ref = swiglu(ref_h, fused=False)
    ref.backward(dy)
    got, got_dh = swiglu_forward_math(h), swiglu_backward_math(h, dy)
    truth_y, truth_dh = _reference_fp64(h, dy)
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_dh, ref_h.grad, rtol=1e-6, atol=1e-6)
        return
    for fused_t, ref_t, truth in ((got, ref, truth_y), (got_dh, ref_h.grad, truth_dh)):
        torch.testing.assert_close(fused_t.float(), ref_t.float(), rtol=2**-7, atol=1e-2)
        err_fused = (fused_t.double() - truth).abs().sum()
        err_ref = (ref_t.double() - truth).abs().sum()
        assert err_fused <= err_ref * 1.001


def test_fused_function_runs_the_compiled_math_for_any_row_count():
    """The Function CUDA uses by default (compiled, dynamic rows) equals the eager math."""
    g = torch.Generator().manual_seed(2)
    for rows in (9, 23, 0):
        h = torch.randn(rows, 16, generator=g, requires_grad=True)
        dy = torch.randn(rows, 8, generator=g)
        y = swiglu(h, fused=True)
        assert type(y.grad_fn).__name__.startswith("_SwiGLUFused")
        y.backward(dy)
        torch.testing.assert_close(y, swiglu_forward_math(h.detach()), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(
            h.grad, swiglu_backward_math(h.detach(), dy), rtol=1e-6, atol=1e-6
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows,F", [(1, 8), (37, 1408), (300, 1500), (64, 4096)])
def test_triton_kernels_equal_the_math_on_cuda(rows, F):
    """Triton SwiGLU (CUDA) against the same formulas in eager fp32: equal up to the one
    rounding to bf16 (sigmoid's last fp32 bit may differ)."""
    from braid.ops import swiglu_triton

    g = torch.Generator(device="cuda").manual_seed(3)
    h = (torch.randn(rows, 2 * F, device="cuda", generator=g) * 3).bfloat16()
    dy = torch.randn(rows, F, device="cuda", generator=g).bfloat16()
    assert swiglu_triton.available(h)
    torch.testing.assert_close(
        swiglu_triton.forward(h), swiglu_forward_math(h), rtol=2**-7, atol=1e-5
    )
    torch.testing.assert_close(
        swiglu_triton.backward(h, dy), swiglu_backward_math(h, dy), rtol=2**-7, atol=1e-5
    )
    y = swiglu(h.clone().requires_grad_(), fused=True)
    assert type(y.grad_fn).__name__.startswith("_SwiGLUFused")


def test_operator_registration_and_math():
    """`braid::swiglu` (what torch.compile sees on CUDA): fake shapes, autograd and schema
    pass torch's operator checks, and its values and grads are the reference math's."""
    from braid.ops.swiglu import swiglu_op

    g = torch.Generator().manual_seed(4)
    h = torch.randn(3, 5, 16, generator=g, requires_grad=True)
    torch.library.opcheck(swiglu_op, (h,))
    y = swiglu_op(h)
    dy = torch.randn(3, 5, 8, generator=g)
    y.backward(dy)
    want = swiglu_forward_math(h.detach().reshape(15, 16)).view(3, 5, 8)
    torch.testing.assert_close(y, want)
    want_dh = swiglu_backward_math(h.detach().reshape(15, 16), dy.reshape(15, 8))
    torch.testing.assert_close(h.grad, want_dh.view(3, 5, 16))
    compiled = torch.compile(swiglu_op, backend="aot_eager")
    torch.testing.assert_close(compiled(h.detach()), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_swiglu_on_cuda_matches_eager():
    g = torch.Generator(device="cuda").manual_seed(5)
    h = (torch.randn(257, 2 * 1408, device="cuda", generator=g)).bfloat16()
    dy = torch.randn(257, 1408, device="cuda", generator=g).bfloat16()
    outs = {}
    for mode in ("eager", "compiled"):
        hh = h.clone().requires_grad_()
        fn = torch.compile(swiglu) if mode == "compiled" else swiglu
        y = fn(hh)
        y.backward(dy)
        outs[mode] = (y.float(), hh.grad.float())
    for a, b in zip(outs["compiled"], outs["eager"], strict=True):
        torch.testing.assert_close(a, b, rtol=2**-7, atol=1e-5)


def test_operator_on_non_contiguous_input():
    """The operator's results are contiguous whatever h's strides, as its fake says."""
    from braid.ops.swiglu import swiglu_op

    h = torch.randn(16, 6, generator=torch.Generator().manual_seed(6)).t().requires_grad_()
    assert not h.is_contiguous()
    torch.library.opcheck(swiglu_op, (h,))
    y = swiglu_op(h)
    assert y.is_contiguous()
    torch.testing.assert_close(y, swiglu_forward_math(h.detach().contiguous()))
