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
from braid.ops.fp8_gemm import fp8_linear
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
    w = torch.randn(48, 64, requires_grad=True)
    xs = [torch.randn(16, 64), torch.randn(64, 16).t(), torch.randn(64), torch.randn(2, 5, 64)]
    for x in xs:  # 2-D, transposed, 1-D and 3-D inputs
        for dw8 in (False, True):
            torch.library.opcheck(fp8_linear_op, (x.requires_grad_(), w, torch.float32, dw8))
    y, xq, sx = fp8_linear_op(xs[0], w, torch.float32, False)
    g = torch.randn_like(y)  # the backward is not differentiated: inputs without grad
    for need in [(True, True), (True, False), (False, True)]:
        for dw8 in (False, True):
            args = (g, xq, sx, w.detach(), torch.float32, dw8, *need)
            torch.library.opcheck(fp8_linear_backward_op, args)


@pytest.mark.parametrize("frozen", ["x", "w"])
def test_operator_skips_the_gradient_not_needed(monkeypatch, frozen):
    """Without grad for x (the first layer's input) or for w (a frozen weight), the backward
    computes only the other gradient, as the eager Function does: equal bits, one GEMM."""
    import braid.ops.fp8_linear_op as op_mod

    torch.manual_seed(3)
    x, w = torch.randn(24, 64), torch.randn(48, 64)
    needs = []
    real = op_mod.linear_backward
    monkeypatch.setattr(op_mod, "linear_backward", lambda *a: (needs.append(a[-1]), real(*a))[1])
    grads = []
    for fn in (lambda a, b: fp8_linear_op(a, b, torch.float32, False)[0],
               lambda a, b: fp8_linear(a, b)):  # fmt: skip
        xi = x.clone().requires_grad_(frozen != "x")
        wi = w.clone().requires_grad_(frozen != "w")
        fn(xi, wi).square().sum().backward()
        grads.append((xi.grad, wi.grad))
    assert needs == [(frozen != "x", frozen != "w")]
    (ox, ow), (ex, ew) = grads
    assert (ox is None, ow is None) == (frozen == "x", frozen == "w")
    for got, want in ((ox, ex), (ow, ew)):
        assert (got is None and want is None) or torch.equal(got, want)


def test_stats_record_under_compile_while_active():
    torch._dynamo.reset()
    torch.manual_seed(2)
    lin = Fp8Linear(64, 48, bias=False)
    lin.fp8_stats, lin.fp8_name = Fp8Stats(), "blocks.0.attn.wq"
    x = torch.randn(3, 64)
    # inactive: the operator, whole (fullgraph fails on a graph break), nothing recorded
    _step(lin, torch.compile(lin, backend="aot_eager", fullgraph=True), x)
    assert lin.fp8_stats.read() == {}
    torch._dynamo.reset()
    lin.fp8_stats.active = True
    want = _step(lin, lin, x)
    lin.fp8_stats.read()
    got = _step(lin, torch.compile(lin, backend="aot_eager"), x)
    names = set(lin.fp8_stats.read())
    assert {"fp8/blocks.0.attn.wq/x/amax", "fp8/blocks.0.attn.wq/grad/underflow"} <= names
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("dw8", [False, True])
def test_no_tokens_give_zero_weight_grads(dw8):
    """An empty batch: the eager Function and the operator give y [0, N] and a zero dW."""
    w = torch.randn(48, 64)
    for fn in (lambda a, b: fp8_linear(a, b, fp8_wgrad=dw8),
               lambda a, b: fp8_linear_op(a, b, torch.float32, dw8)[0]):  # fmt: skip
        x, wi = torch.randn(0, 64, requires_grad=True), w.clone().requires_grad_()
        y = fn(x, wi)
        y.sum().backward()
        assert y.shape == (0, 48) and x.grad.shape == (0, 64)
        assert torch.equal(wi.grad, torch.zeros_like(w))
