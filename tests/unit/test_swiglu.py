"""The lean SwiGLU Function equals autograd's unfused expression bit for bit (value and grad)."""

import pytest
import torch
import torch.nn.functional as F

from braid.ops.swiglu import swiglu


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


def test_swiglu_saves_only_its_input():
    h = torch.randn(8, 6, requires_grad=True)
    y = swiglu(h)
    assert [t.data_ptr() for t in y.grad_fn.saved_tensors] == [h.data_ptr()]
