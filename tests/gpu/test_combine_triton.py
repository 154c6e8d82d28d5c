"""The Triton combine kernels (braid.ops.combine_triton) against the reference math of
braid.ops.permute on an H100/H200-class GPU:

    PYTHONPATH=src python -m pytest -q -m gpu tests/gpu/test_combine_triton.py

dy is one fp32 product rounded once in both: equal bit for bit. out and dgates are fp32 sums
in another order: within one rounding of the output dtype (out, bf16; plus 1e-6 of the sum of
the products' magnitudes, where the sum cancels) and 1e-5 relative (dgates, fp32)."""

import pytest
import torch

from braid.ops import combine_triton
from braid.ops.permute import combine_backward_math, combine_forward_math, inverse_permutation

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
]


@pytest.mark.parametrize("N, K, D", [(1000, 8, 2048), (333, 2, 4096), (17, 3, 5000)])
def test_triton_combine_equals_the_reference_math(N, K, D):
    g = torch.Generator(device="cuda").manual_seed(0)
    order = torch.randperm(N * K, device="cuda", generator=g)
    pos = inverse_permutation(order).view(N, K)
    y = torch.randn(N * K, D, device="cuda", generator=g).bfloat16()
    gates = torch.rand(N, K, device="cuda", generator=g)
    gy = torch.randn(N, D, device="cuda", generator=g).bfloat16()
    out = combine_triton.forward(y, gates, pos)
    ref = combine_forward_math(y, gates, pos)
    terms = combine_forward_math(y.abs(), gates, pos).float()  # sum of |products|
    bound = ref.float().abs() * 2.0**-7 + terms * 1e-6  # one bf16 step + fp32 order effects
    assert ((out.float() - ref.float()).abs() <= bound).all()
    dy, dgates = combine_triton.backward(y, gates, pos, gy)
    rdy, rdgates = combine_backward_math(y, gates, pos, order, gy)
    assert torch.equal(dy, rdy)
    torch.testing.assert_close(dgates, rdgates, rtol=1e-5, atol=1e-5 * rdgates.abs().max().item())


def test_compiled_combine_uses_the_operator_and_matches_eager():
    from braid.ops.permute import combine_tokens

    g = torch.Generator(device="cuda").manual_seed(1)
    N, K, D = 300, 4, 1024
    order = torch.randperm(N * K, device="cuda", generator=g)
    pos = inverse_permutation(order).view(N, K)
    y = torch.randn(N * K, D, device="cuda", generator=g).bfloat16()
    gates = torch.rand(N, K, device="cuda", generator=g)
    gy = torch.randn(N, D, device="cuda", generator=g).bfloat16()
    outs = {}
    for mode in ("eager", "compiled"):
        yy, gg = y.clone().requires_grad_(), gates.clone().requires_grad_()
        fn = torch.compile(combine_tokens, dynamic=True) if mode == "compiled" else combine_tokens
        out = fn(yy, gg, pos, order)
        out.backward(gy)
        outs[mode] = (out, yy.grad, gg.grad)
    for what, a, b in zip(("out", "dy", "dgates"), outs["compiled"], outs["eager"], strict=True):
        assert torch.equal(a, b), what  # the same Triton kernels in both
