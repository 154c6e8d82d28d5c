"""`braid::fp8_linear`: the dense fp8 linear as an operator torch.compile keeps whole.

Compiled with `fullgraph=True` (so a graph break fails the test), `Fp8Linear` must give bit for
bit the eager Function's output and gradients, with and without fp8 dW, a bias and autocast;
the operators pass `torch.library.opcheck`; while stats record, the eager Function runs
(behind a graph break) and records them.
"""

from __future__ import annotations

import pytest
import torch

from braid.model.fp8_linear import Fp8Linear
from braid.ops.fp8_linear_op import fp8_linear_backward_op, fp8_linear_op
from braid.ops.fp8_stats import Fp8Stats


def _step(module, fn, x):
    xi = x.clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    y = fn(xi)
    (y.float().square().sum()).backward()
    return [y, xi.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("dw8", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("amp", [False, True])
def test_compiled_fp8_linear_equals_eager_bitwise(dw8, bias, amp):
    torch._dynamo.reset()
    torch.manual_seed(0)
    lin = Fp8Linear(64, 48, bias=bias)
    lin.fp8_wgrad = dw8
    x = torch.randn(2, 40, 64)
    compiled = torch.compile(lin, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        want = _step(lin, lin, x)
        got = _step(lin, compiled, x)
    assert want[0].dtype == (torch.bfloat16 if amp else torch.float32)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.abs().sum() > 0, i  # not the zeros a traced Function once gave
        assert torch.equal(g, w), i


def test_operators_pass_opcheck():
    torch.manual_seed(1)
    x = torch.randn(16, 64, requires_grad=True)
    w = torch.randn(48, 64, requires_grad=True)
    for dw8 in (False, True):
        torch.library.opcheck(fp8_linear_op, (x, w, torch.float32, dw8))
    y, xq, sx = fp8_linear_op(x, w, torch.float32, False)
    g = torch.randn_like(y)  # the backward is not differentiated: inputs without grad
    for dw8 in (False, True):
        args = (g, xq, sx, w.detach(), torch.float32, dw8)
        torch.library.opcheck(fp8_linear_backward_op, args)


def test_stats_record_under_compile_while_active():
    torch._dynamo.reset()
    torch.manual_seed(2)
    lin = Fp8Linear(64, 48, bias=False)
    lin.fp8_stats, lin.fp8_name = Fp8Stats(), "blocks.0.attn.wq"
    compiled = torch.compile(lin, backend="aot_eager")
    x = torch.randn(3, 64)
    _step(lin, compiled, x)
    assert lin.fp8_stats.read() == {}  # inactive: the operator, nothing recorded
    lin.fp8_stats.active = True
    want = _step(lin, lin, x)
    lin.fp8_stats.read()
    got = _step(lin, compiled, x)
    names = set(lin.fp8_stats.read())
    assert {"fp8/blocks.0.attn.wq/x/amax", "fp8/blocks.0.attn.wq/grad/underflow"} <= names
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
