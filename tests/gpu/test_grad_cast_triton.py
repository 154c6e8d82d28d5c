"""The Triton grad cast (braid.ops.grad_cast) against torch's expressions on a GPU:

    PYTHONPATH=src python -m pytest -q -m gpu tests/gpu/test_grad_cast_triton.py

bf16 -> fp32 is exact and the add rounds once in fp32 in both: equal bit for bit, also at sizes
that are not multiples of the kernel's block."""

import pytest
import torch

from braid.ops import grad_cast

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
]


@pytest.mark.parametrize("shape", [(1,), (4095,), (4097,), (1408, 2048), (3, 5000, 7)])
def test_triton_grad_cast_equals_torch(shape):
    g = torch.Generator(device="cuda").manual_seed(0)
    grad = (torch.randn(shape, device="cuda", generator=g) * 3).bfloat16()
    assert grad_cast.available(grad)
    fresh = grad_cast.into_fp32(None, grad)
    assert fresh.dtype == torch.float32 and torch.equal(fresh, grad.float())
    acc = torch.randn(shape, device="cuda", generator=g)
    want = acc.clone().add_(grad)
    got = grad_cast.into_fp32(acc, grad)
    assert got is acc  # in place
    assert torch.equal(got, want)
    assert not torch.equal(want, acc.clone().sub_(grad))  # the check can fail
    assert grad_cast.into_fp32(acc, grad, add=False) is acc and torch.equal(acc, grad.float())
    rows = torch.zeros((2 * shape[0], *shape[1:]), device="cuda")  # a slice, as a chunk's rows
    grad_cast.into_fp32(rows[shape[0] :], grad, add=False)
    assert torch.equal(rows[shape[0] :], grad.float()) and not rows[: shape[0]].any()
