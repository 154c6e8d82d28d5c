"""braid.ops.grad_cast on CPU: the torch expressions it stands for, and its refusals (the
Triton kernel's bitwise check is tests/gpu/test_grad_cast_triton.py)."""

import pytest
import torch

from braid.ops.grad_cast import available, into_fp32


def test_cpu_path_is_the_torch_expressions():
    g = (torch.randn(7, 5) * 3).bfloat16()
    assert not available(g)
    fresh = into_fp32(None, g)
    assert fresh.dtype == torch.float32 and torch.equal(fresh, g.float())
    acc = torch.randn(7, 5)
    want = acc + g.float()
    got = into_fp32(acc, g)
    assert got is acc and torch.equal(got, want)
    assert into_fp32(acc, g, add=False) is acc and torch.equal(acc, g.float())


def test_refuses_a_mismatched_accumulator():
    g = torch.randn(4, 3).bfloat16()
    with pytest.raises(ValueError, match=r"accumulator \(3, 4\) torch.float32.*\(4, 3\)"):
        into_fp32(torch.zeros(3, 4), g)
    with pytest.raises(ValueError, match="torch.bfloat16"):
        into_fp32(torch.zeros(4, 3, dtype=torch.bfloat16), g)
