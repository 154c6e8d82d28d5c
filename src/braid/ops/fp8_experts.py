"""The routed experts' SwiGLU FFN in fp8 as one autograd Function: the quantisers are fused
with the SwiGLU and with each other so no activation is quantised from a tensor that was written
only to be read back.

    forward   xq = q(x)            (or the codes the fp8 dispatch received)
              h  = xq @ q_cols(w13)                       [R, 2F] bf16, kept for backward
              yq = q(swiglu(h))    one kernel: y is never written
              out = yq @ q_cols(w2)
    backward  dy = q(g) @ q_rows(w2)^T
              dh, dhq = swiglu'(h, dy) and q(dh)   one kernel
              dx = dhq @ q_rows(w13)^T
              dW2 = y^T g,  dW13 = x^T dh  from the saved codes: dequantised to bf16 in one
              pass, or (`fp8_wgrad`) quantised per (expert, column) straight from the codes
              into the 2d-2d fp8 grouped GEMM's layout.
Numerically this is `fp8_gemm.fp8_grouped_linear` (w13) -> swiglu -> `fp8_grouped_linear` (w2)
(the same recipe, the same roundings; tests check it against that composition), with the
SwiGLU's fp32 formulas of `braid.ops.swiglu_triton`. On CUDA with Triton the fused kernels are
`braid.ops.fp8_triton`; elsewhere the reference quantisers run in sequence (the emulation).
Under torch.compile it runs eagerly, as the other fp8 GEMMs do (`braid.ops.fp8_gemm`).
Shapes: R rows, D model dim, F expert hidden size, E experts, W padded width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from braid.ops import fp8, fp8_triton, swiglu_triton
from braid.ops.fp8_gemm import (
    dequantize_rows,
    padded_groups,
    padded_offsets,
    scaled_grouped_mm,
    scaled_grouped_wgrad,
)
from braid.ops.fp8_stats import Fp8Stats
from braid.ops.grouped_gemm import (
    Part,
    WeightCasts,
    WgradSink,
    _local,
    compute_dtype,
    deliver_wgrad,
    gmm_wgrad,
    shared,
)
from braid.ops.swiglu import swiglu_backward_math, swiglu_forward_math


def _fused(x: Tensor) -> bool:
    return fp8_triton.available(x)


def swiglu_quantize(h: Tensor) -> tuple[Tensor, Tensor]:
    if _fused(h):
        return fp8_triton.swiglu_quantize(h)
    return fp8.quantize(swiglu_forward_math(h))


def swiglu_values(h: Tensor) -> Tensor:
    """The SwiGLU output the codes of `swiglu_quantize` come from (for the numerics report)."""
    return swiglu_triton.forward(h) if swiglu_triton.available(h) else swiglu_forward_math(h)


def swiglu_backward_quantize(h: Tensor, dy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if _fused(h):
        return fp8_triton.swiglu_backward_quantize(h, dy)
    dh = swiglu_backward_math(h, dy)
    return (dh, *fp8.quantize(dh))


def wgrad(
    x: Tensor, sx: Tensor | None, g: Tensor, offs: Tensor, impl: str, fp8_wgrad: bool
) -> Tensor:
    """dW[e] = x_e^T g_e [E, D, F] in g's dtype; x is rowwise codes with scales `sx` (or plain
    rows when `sx` is None). In bf16 from the dequantised codes, or (`fp8_wgrad`) in the 2d-2d
    fp8 grouped GEMM with both operands scaled per (expert, column)."""
    if not fp8_wgrad:
        x = x if sx is None else dequantize_rows(x, sx, g.dtype)
        return gmm_wgrad(x, g, offs, impl)
    if _fused(g):
        _, _, offs_pad, width = padded_offsets(offs, x.shape[0])
        xq, sxg = fp8_triton.quantize_groups(x, offs, offs_pad, width, sx)
        gq, sgg = fp8_triton.quantize_groups(g, offs, offs_pad, width)
    else:
        gid, dest, offs_pad, width = padded_groups(offs, x.shape[0])
        x = x if sx is None else fp8.dequantize(x, sx, g.dtype)
        xq, sxg = fp8.quantize_groups_ref(x, gid, dest, offs.numel(), width)
        gq, sgg = fp8.quantize_groups_ref(g, gid, dest, offs.numel(), width)
    return scaled_grouped_wgrad(xq, sxg, gq, sgg, offs_pad, g.dtype, impl)


def _record(stats: Fp8Stats | None, name: str, x: Callable[[], Tensor], q: Tensor) -> None:
    if stats is not None and stats.active:
        stats.record(name, x(), q)


def _weight_codes(
    w: Tensor, casts: WeightCasts | None, rows: bool, part: Part | None
) -> tuple[Tensor, Tensor]:
    """`w`'s codes for the forward GEMM (columnwise) or for dX (`rows`: rowwise), quantised
    once per `casts` dict: the chunks of a pipelined layer share them (the forward's are
    dropped when its `shared_casts` block ends, the backward's with the layer's last ctx: both
    weights' rowwise codes then live through the layer's backward, one fp8 copy). With `part`,
    those of experts [lo, hi) (views: codes and scales lead with the expert)."""
    quantize = fp8.quantize if rows else fp8.quantize_cols
    q, s = shared(casts, w, "e4m3 rows" if rows else "e4m3 cols", lambda: quantize(_local(w)))
    return (q, s) if part is None else (q[part[0] : part[1]], s[part[0] : part[1]])


class _Fp8SwiGLUExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RD, w13, w2, offs, impl, sink, divide, pre, stats, name, dw8, casts, part):
        dt = compute_dtype(x_RD)
        if pre is None:
            xq, sx = fp8.quantize(x_RD)
            _record(stats, f"{name}.w13/x", lambda: x_RD, xq)
        else:
            xq, sx = pre
        w13q, s13 = _weight_codes(w13, casts, False, part)  # [E, 2F, D]: scales along D
        h = scaled_grouped_mm(xq, sx, w13q, s13, offs, dt, impl)
        yq, sy = swiglu_quantize(h)
        _record(stats, f"{name}.w2/x", lambda: swiglu_values(h), yq)
        w2q, s2 = _weight_codes(w2, casts, False, part)  # [E, D, F]: scales along F
        ctx.save_for_backward(xq, sx, h, yq, sy, offs)
        ctx.w13, ctx.w2, ctx.impl, ctx.sink, ctx.divide = w13, w2, impl, sink, divide
        ctx.casts, ctx.part = casts, part
        ctx.x_dtype, ctx.dt, ctx.stats, ctx.name, ctx.dw8 = x_RD.dtype, dt, stats, name, dw8
        return scaled_grouped_mm(yq, sy, w2q, s2, offs, dt, impl)

    @staticmethod
    def backward(ctx, g_RD):
        xq, sx, h, yq, sy, offs = ctx.saved_tensors
        dt, impl, name, dw8 = ctx.dt, ctx.impl, ctx.name, ctx.dw8
        g_RD = g_RD.to(dt).contiguous()
        gq, sg = fp8.quantize(g_RD)
        _record(ctx.stats, f"{name}.w2/grad", lambda: g_RD, gq)
        w2q, s2 = _weight_codes(ctx.w2, ctx.casts, True, ctx.part)  # [E, F, D]: along D, dX's
        dy = scaled_grouped_mm(gq, sg, w2q, s2, offs, dt, impl)
        del gq, w2q
        # w2's dW first, as the unfused backward meets it (and frees g and y's codes sooner)
        dw2 = _deliver(ctx, 2, lambda: wgrad(yq, sy, g_RD, offs, impl, dw8))
        dh, dhq, sdh = swiglu_backward_quantize(h, dy)
        del dy
        # h [R, 2F] is this Function's own intermediate and nothing reads it after here, but
        # autograd holds saved tensors until backward returns: give its memory back now, as
        # the unfused composition's SwiGLU node did (a second backward through this graph,
        # retain_graph, then fails on the empty storage instead of reading stale values).
        h.untyped_storage().resize_(0)
        _record(ctx.stats, f"{name}.w13/grad", lambda: dh, dhq)
        dx = None
        if ctx.needs_input_grad[0]:
            w13q, s13 = _weight_codes(ctx.w13, ctx.casts, True, ctx.part)  # [E, D, 2F]: along 2F
            dx = scaled_grouped_mm(dhq, sdh, w13q, s13, offs, dt, impl).to(ctx.x_dtype)
        del dhq
        dw13 = _deliver(ctx, 1, lambda: wgrad(xq, sx, dh, offs, impl, dw8))
        return dx, dw13, dw2, *[None] * 10


def _deliver(ctx, i: int, dw_fn: Callable[[], Tensor]) -> Tensor | None:
    """Input i's weight gradient, if autograd wants it (`grouped_gemm.deliver_wgrad`)."""
    if not ctx.needs_input_grad[i]:
        return None
    return deliver_wgrad(ctx.w13 if i == 1 else ctx.w2, dw_fn, ctx.divide, ctx.sink, ctx.part)


@torch.compiler.disable
def fp8_swiglu_experts(
    x_RD: Tensor,
    w13: Tensor,
    w2: Tensor,
    offs_E: Tensor,
    impl: str = "grouped",
    wgrad_sink: WgradSink | None = None,
    grad_divide: float = 1.0,
    pre: tuple[Tensor, Tensor] | None = None,
    stats: Fp8Stats | None = None,
    name: str = "experts",
    fp8_wgrad: bool = False,
    casts: WeightCasts | None = None,
    part: Part | None = None,
) -> Tensor:
    """w2-GEMM(swiglu(w13-GEMM(x))) per expert group, in fp8; the arguments are
    `fp8_gemm.fp8_grouped_linear`'s (`pre`: rows quantised before an exchange, `x_RD` then only
    the anchor of their gradient); `casts` shares the weights' forward codes between the calls
    that pass the same dict (`grouped_gemm.cast_weight`); `part` as `grouped_linear`'s."""
    return _Fp8SwiGLUExperts.apply(
        x_RD, w13, w2, offs_E, impl, wgrad_sink, grad_divide, pre, stats, name, fp8_wgrad, casts,
        part,
    )  # fmt: skip
