"""The Triton grad cast (braid.ops.grad_cast) against torch's expressions on a GPU:

    PYTHONPATH=src python -m pytest -q -m gpu tests/gpu/test_grad_cast_triton.py

bf16 -> fp32 is exact and the add rounds once in fp32 in both: equal bit for bit (compared as
int32 words, so -0/+0 and NaN payloads count), with subnormals, infinities, NaN and signed
zeros among the inputs, at sizes that are not multiples of the kernel's block, and into a
slice of a larger tensor (a chunk's rows)."""

import pytest
import torch

from braid.ops import grad_cast

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
]

SPECIAL = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-40, 3e38]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def grad_of(shape, g):
    grad = (torch.randn(shape, device="cuda", generator=g) * 3).bfloat16()
    flat = grad.view(-1)
    k = min(len(SPECIAL), flat.numel())
    flat[:k] = torch.tensor(SPECIAL[:k], device="cuda").bfloat16()
    return grad


@pytest.mark.parametrize("shape", [(1,), (4095,), (4097,), (1408, 2048), (3, 5000, 7)])
def test_triton_grad_cast_equals_torch(shape):
    g = torch.Generator(device="cuda").manual_seed(0)
    grad = grad_of(shape, g)
    assert grad_cast.available(grad)
    fresh = grad_cast.into_fp32(None, grad)
    assert fresh.dtype == torch.float32 and torch.equal(bits(fresh), bits(grad.float()))
    acc = torch.randn(shape, device="cuda", generator=g)
    acc.view(-1)[-1] = -0.0
    want = acc.clone().add_(grad)
    version = acc._version
    got = grad_cast.into_fp32(acc, grad)
    assert got is acc and acc._version > version  # in place, seen by autograd's checks
    assert torch.equal(bits(got), bits(want))
    if grad.numel() > len(SPECIAL):  # the check can fail (a grad of (1,) is one zero)
        assert not torch.equal(bits(want), bits(acc.clone().sub_(grad)))
    assert grad_cast.into_fp32(acc, grad, add=False) is acc
    assert torch.equal(bits(acc), bits(grad.float()))
    rows = torch.zeros((2 * shape[0], *shape[1:]), device="cuda")  # a slice, as a chunk's rows
    grad_cast.into_fp32(rows[shape[0] :], grad, add=False)
    assert torch.equal(bits(rows[shape[0] :]), bits(grad.float())) and not rows[: shape[0]].any()


def test_refuses_what_the_kernel_cannot_take():
    grad = torch.randn(64, device="cuda").bfloat16()
    assert grad_cast.available(grad, torch.zeros(64, device="cuda"))
    assert not grad_cast.available(grad, torch.zeros(64))  # accumulator on the CPU
    assert not grad_cast.available(grad[::2])  # strided
    assert not grad_cast.available(grad.requires_grad_())  # autograd would record it
