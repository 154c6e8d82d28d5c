"""The dense fp8 linear as operators torch.compile keeps whole: `braid::fp8_linear` and its
backward `braid::fp8_linear_backward` (registered autograd and fake kernels).

`braid.ops.fp8_gemm.fp8_linear` runs its autograd Function eagerly (`torch.compiler.disable`):
traced, the Function's backward gave all-zero gradients on CUDA (torch 2.11), and a graph break
around every linear costs a compiled block its fusion across them (norms, RoPE, residual adds).
These operators run the same math (`linear_forward` / `linear_backward`, bit for bit the
Function's) as opaque calls inside the compiled graph: no graph break, nothing traced inside.
They record no `fp8/*` stats (Python-side state); `Fp8Linear` takes the eager Function on the
steps that record them.
Shapes: M tokens, K in-features, N out-features; x [..., K], w [N, K].
"""

from __future__ import annotations

import torch
from torch import Tensor

from braid.ops.fp8 import E4M3
from braid.ops.fp8_gemm import linear_backward, linear_forward
from braid.ops.grouped_gemm import compute_dtype


@torch.library.custom_op("braid::fp8_linear", mutates_args=())
def fp8_linear_op(
    x: Tensor, w: Tensor, out_dtype: torch.dtype, dw8: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(y [..., N] in `out_dtype`, x's e4m3 codes as uint8 [M, K], their scales [M, 1]); the
    codes and scales are what the backward needs. `dw8`: dW in fp8 (read by the backward)."""
    y, xq, sx = linear_forward(x, w, out_dtype)
    return y.contiguous(), xq.contiguous().view(torch.uint8), sx.contiguous()


@fp8_linear_op.register_fake
def _(x: Tensor, w: Tensor, out_dtype: torch.dtype, dw8: bool) -> tuple[Tensor, Tensor, Tensor]:
    M = x.numel() // x.shape[-1]
    y = x.new_empty(*x.shape[:-1], w.shape[0], dtype=out_dtype)
    return y, x.new_empty(M, x.shape[-1], dtype=torch.uint8), x.new_empty(M, 1, dtype=torch.float32)


@torch.library.custom_op("braid::fp8_linear_backward", mutates_args=())
def fp8_linear_backward_op(
    g: Tensor, xq: Tensor, sx: Tensor, w: Tensor, x_dtype: torch.dtype, dw8: bool,
    need_dx: bool, need_dw: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(dx [..., K] in `x_dtype`, dw [N, K] in w's dtype) from the output gradient `g`; one
    that is not needed is computed not at all and returned empty (0 elements)."""
    dx, dw = linear_backward(g, xq.view(E4M3), sx, w, x_dtype, dw8, (need_dx, need_dw))
    dx = g.new_empty(0, dtype=x_dtype) if dx is None else dx.contiguous()
    return dx, w.new_empty(0) if dw is None else dw.contiguous()


@fp8_linear_backward_op.register_fake
def _(g, xq, sx, w, x_dtype, dw8, need_dx, need_dw):
    dx_shape = (*g.shape[:-1], w.shape[1]) if need_dx else (0,)
    dw = torch.empty_like(w, memory_format=torch.contiguous_format) if need_dw else w.new_empty(0)
    return g.new_empty(dx_shape, dtype=x_dtype), dw


def _setup(ctx, inputs, output) -> None:
    x, w, _, dw8 = inputs
    _, xq, sx = output
    ctx.save_for_backward(xq, sx, w)
    ctx.x_dtype, ctx.dw8 = x.dtype, dw8
    ctx.mark_non_differentiable(xq, sx)


def _backward(ctx, g: Tensor, _gq, _gs):
    xq, sx, w = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = fp8_linear_backward_op(g, xq, sx, w, ctx.x_dtype, ctx.dw8, need_dx, need_dw)
    return dx if need_dx else None, dw if need_dw else None, None, None


fp8_linear_op.register_autograd(_backward, setup_context=_setup)


def fp8_linear_traced(x: Tensor, w: Tensor, dw8: bool = False) -> Tensor:
    """`fp8_gemm.fp8_linear` without stats, as one operator inside compiled code."""
    return fp8_linear_op(x, w, compute_dtype(x), dw8)[0]
