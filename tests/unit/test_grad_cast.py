"""braid.ops.grad_cast on CPU: the torch expressions it stands for, its refusals, and which
weight-grad conversions go through it (the Triton kernel's bitwise check is
tests/gpu/test_grad_cast_triton.py)."""

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


def _spy(monkeypatch, module):
    """Record each call of `module.into_fp32` as (acc, add), then run the real function."""
    calls = []

    def spy(acc, g, add=True):
        calls.append((acc, add))
        return into_fp32(acc, g, add)  # the function imported above, not a patched name

    monkeypatch.setattr(module, "into_fp32", spy)
    return calls


def test_weight_grads_route_through_into_fp32(monkeypatch):
    """Which conversions take the vectorized pass (the same bits either way, so only a spy sees
    it): a bf16 dW added into an fp32 grad, in place; a chunk's rows written, then added; a
    new grad; not a divided dW's add (cast first, then divided and added in fp32)."""
    from braid.ops import grad_cast, grouped_gemm

    calls = _spy(monkeypatch, grouped_gemm)
    cast_calls = _spy(monkeypatch, grad_cast)  # `cast` calls the module's into_fp32
    w = torch.nn.Parameter(torch.zeros(4, 3, 2))
    dw = torch.randn(4, 3, 2).bfloat16()
    grouped_gemm.accumulate_grad(w, dw)  # new grad: cast
    assert cast_calls == [(None, True)] and calls == []
    first = w.grad
    grouped_gemm.accumulate_grad(w, dw)  # added in place into the same grad
    assert w.grad is first and calls == [(first, True)]
    assert torch.equal(w.grad, 2 * dw.float())
    calls.clear()
    grouped_gemm.accumulate_grad(w, dw, divide=2.0)
    assert calls == []
    w.grad = None
    calls.clear()
    grouped_gemm.accumulate_grad(w, dw[:2], part=(0, 2, True))  # a covering chunk: written
    grouped_gemm.accumulate_grad(w, dw[2:], part=(2, 4, True))
    grouped_gemm.accumulate_grad(w, dw[:2], part=(0, 2, True))  # whole now: added
    assert [add for _, add in calls] == [False, False, True]
    assert torch.equal(w.grad[:2], 2 * dw[:2].float()) and torch.equal(w.grad[2:], dw[2:].float())


def test_step_cast_moves_grads_through_into_fp32(monkeypatch):
    from braid.train import weight_cast

    calls = _spy(monkeypatch, weight_cast)
    lin = torch.nn.Linear(8, 4, bias=False)
    cast = weight_cast.StepCast(lin)
    with cast.swapped():
        for _ in range(2):
            lin(torch.randn(3, 8).bfloat16()).float().sum().backward()
    assert [acc is None for acc, _ in calls] == [True, False]  # written, then added
    assert lin.weight.grad.dtype == torch.float32
