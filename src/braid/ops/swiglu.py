"""SwiGLU on the fused gate|up GEMM output: silu(h[:, :F]) * h[:, F:], with a lean backward.

Autograd of `gate, up = h.chunk(2); silu(gate) * up` keeps three [R, F] tensors (gate for silu's
backward, silu(gate) and up for the product's) and concatenates the two halves of the gradient
in an extra copy. This Function keeps only `h` (two halves' worth, a third less) and writes both
halves of dh in place into one [R, 2F] buffer:
    dgate = silu'(gate) * (dy * up)      (aten's silu_backward, one kernel)
    dup   = dy * silu(gate)              (silu recomputed from `h`)
The arithmetic is autograd's own kernels, so results equal the unfused expression's. Under
torch.compile the plain expression is traced instead (the compiler fuses it anyway).
Shapes: R rows, F expert hidden size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_RF2):
        gate, up = h_RF2.chunk(2, dim=-1)
        ctx.save_for_backward(h_RF2)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, dy_RF):
        (h_RF2,) = ctx.saved_tensors
        gate, up = h_RF2.chunk(2, dim=-1)
        dy_RF = dy_RF.to(h_RF2.dtype)
        dh_RF2 = torch.empty_like(h_RF2)
        dgate, dup = dh_RF2.chunk(2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(dy_RF * up, gate, grad_input=dgate)
        torch.mul(dy_RF, F.silu(gate), out=dup)
        return dh_RF2


def swiglu(h_RF2: Tensor) -> Tensor:
    """silu(gate) * up for h = [gate | up] along the last dim."""
    if torch.compiler.is_compiling():
        gate, up = h_RF2.chunk(2, dim=-1)
        return F.silu(gate) * up
    return _SwiGLU.apply(h_RF2)


def gated(shared_ND: Tensor, x_ND: Tensor, gate: Callable[[Tensor], Tensor] | None) -> Tensor:
    """A shared expert's output times sigmoid(gate(x)) per token (Qwen2-MoE's gated shared
    expert); unchanged when there is no gate."""
    if gate is None:
        return shared_ND
    return shared_ND * torch.sigmoid(gate(x_ND)).to(shared_ND.dtype)


class SwiGLU(nn.Module):
    """y = W2 (silu(W1 x) * W3 x); W1 and W3 are stored fused as one [2F, D] matrix."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(swiglu(self.w13(x)))
