"""fp8 GEMMs for training: the grouped expert GEMM and the dense linear, forward, dX and dW.

Recipe (rowwise e4m3, dynamic scales from `braid.ops.fp8`; scales always run along the
reduction dim of the GEMM they feed):
  forward  y  = x @ w      x: a scale per row; w: a scale per output column (per expert)
  dX       dx = g @ w^T    g: a scale per row (e4m3 too: rowwise scales adapt to each row's
                           range, which is what e5m2's wider exponent buys with tensor scales);
                           w: a scale per input row (per expert), re-quantised in backward
  dW       dw = x^T @ g    by default in the compute dtype (bf16 on GPU) from the saved fp8 x,
                           dequantised. With `fp8_wgrad` in e4m3 too. Grouped: its
                           reduction runs over tokens, so both operands get a scale per (expert,
                           column) over that expert's rows and are transposed into a layout
                           whose expert groups start at multiples of 16 tokens (zero columns
                           between): the 2d-2d form of `_scaled_grouped_mm`. x is re-quantised
                           from its saved fp8 codes (dequantised exactly to bf16), so dW sees
                           two roundings of x; g is quantised from bf16. The dense linear's dW
                           likewise, with `_scaled_mm` (tokens zero-padded to a multiple of 16).
Under torch.compile both GEMM Functions run eagerly (`torch.compiler.disable`: a graph break
on each side): traced by torch 2.11 on CUDA, their backward gave all-zero gradients while the
forward was right (tests/unit/test_fp8_cuda.py checks compiled against eager and fp32). The
dense linear's math is also an operator the compiler keeps whole (`braid.ops.fp8_linear_op`,
what `Fp8Linear` calls inside compiled code).
The forward saves x as fp8 plus scales (half of bf16's activation memory). Outputs and dx are
in the compute dtype; dW lands in the parameter's dtype.

On CUDA the GEMMs are `torch._scaled_grouped_mm` / `torch._scaled_mm` with fast accumulation
(SM90+). Elsewhere (`emulated`) the same fp8 codes and scales are dequantised and multiplied in
fp32 (autocast off): numerically the fp8 GEMM with exact accumulation, so every code path runs
in CPU tests. The grouped GEMM keeps `grouped_linear`'s dW/dX contract: with a `wgrad_sink`
the dW task is handed to the overlap scheduler instead of being computed at once.

`pre=(q_RD, s_R1)` lets the grouped GEMM consume rows that were quantised before an exchange
(the dispatcher sends fp8): `x_RD` is then only the autograd anchor for dX (any [R, D] tensor,
typically an expanded scalar) and its values are never read.
Shapes: R rows, D in-features, F out-features, E experts, M tokens, K in, N out (dense).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from braid.ops import fp8, fp8_triton
from braid.ops.fp8_stats import Fp8Stats
from braid.ops.grad_cast import cast
from braid.ops.grouped_gemm import (
    WgradSink,
    _local,
    compute_dtype,
    deliver_wgrad,
    gmm,
    gmm_wgrad,
)


@dataclass
class Fp8Rows:
    """Rows already quantised (received as fp8): codes, scales, and the autograd anchor whose
    gradient is the rows' dX (an [R, D] tensor of the compute dtype; its values are unused)."""

    q_RD: Tensor
    s_R1: Tensor
    anchor_RD: Tensor


def emulated(x: Tensor) -> bool:
    """Whether fp8 GEMMs on x's device run emulated (anything but CUDA)."""
    return not x.is_cuda


def scaled_grouped_mm(
    xq_RK: Tensor,
    sx_R1: Tensor,
    wq_ENK: Tensor,
    sw_EN1: Tensor,
    offs_E: Tensor,
    out_dtype: torch.dtype,
    impl: str = "grouped",
) -> Tensor:
    """y[rows of e] = (xq * sx)[rows of e] @ (wq[e] * sw[e])^T; wq is [E, N, K] contiguous."""
    if not emulated(xq_RK):
        y = torch._scaled_grouped_mm(
            xq_RK,
            wq_ENK.transpose(-2, -1),
            sx_R1.reshape(-1).contiguous(),
            sw_EN1.squeeze(-1).contiguous(),
            offs=offs_E,
            out_dtype=torch.bfloat16,
            use_fast_accum=True,
        )
        return y.to(out_dtype)
    with torch.autocast(xq_RK.device.type, enabled=False):
        x, w = fp8.dequantize(xq_RK, sx_R1), fp8.dequantize(wq_ENK, sw_EN1)
        return gmm(x, w.transpose(-2, -1), offs_E, impl).to(out_dtype)


def scaled_mm(
    xq_MK: Tensor, sx_M1: Tensor, wq_NK: Tensor, sw_N1: Tensor, out_dtype: torch.dtype
) -> Tensor:
    """(xq * sx) @ (wq * sw)^T; wq is [N, K] contiguous."""
    if not emulated(xq_MK):
        y = torch._scaled_mm(
            xq_MK,
            wq_NK.t(),
            scale_a=sx_M1.reshape(-1, 1).contiguous(),
            scale_b=sw_N1.reshape(1, -1).contiguous(),
            out_dtype=torch.bfloat16,
            use_fast_accum=True,
        )
        return y.to(out_dtype)
    with torch.autocast(xq_MK.device.type, enabled=False):
        return (fp8.dequantize(xq_MK, sx_M1) @ fp8.dequantize(wq_NK, sw_N1).t()).to(out_dtype)


ALIGN = 16  # 2d-2d fp8 grouped GEMM: each group's start along the reduction, in elements


def padded_offsets(offs_E: Tensor, R: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """(per-group counts, padded counts, padded group ends as int32, the layout's width) of
    `padded_groups`, without the per-row maps (the Triton quantiser derives those itself)."""
    counts = torch.diff(offs_E.long(), prepend=offs_E.new_zeros(1, dtype=torch.long))
    padded = (counts + ALIGN - 1) // ALIGN * ALIGN
    width = (R + ALIGN - 1) // ALIGN * ALIGN + ALIGN * offs_E.numel()
    return counts, padded, torch.cumsum(padded, 0).to(torch.int32), width


def padded_groups(offs_E: Tensor, R: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """For rows grouped by `offs_E`: each row's group, its column in a layout where every
    group starts at a multiple of ALIGN, the padded group offsets (int32), and that layout's
    width (a static bound, R rounded up plus ALIGN per group: no host sync)."""
    E, dev = offs_E.numel(), offs_E.device
    counts, padded, pad_end, width = padded_offsets(offs_E, R)
    gid = torch.repeat_interleave(torch.arange(E, device=dev), counts, output_size=R)
    shift = (pad_end - padded) - (offs_E.long() - counts)  # padded start - start, per group
    dest = torch.arange(R, device=dev) + shift.index_select(0, gid)
    return gid, dest, pad_end, width


def scaled_grouped_wgrad(
    xq_DW: Tensor,
    sx_ED: Tensor,
    gq_FW: Tensor,
    sg_EF: Tensor,
    offs_pad_E: Tensor,
    out_dtype: torch.dtype,
    impl: str = "grouped",
) -> Tensor:
    """dW[e] = (x_e s_x[e])^T (g_e s_g[e]) -> [E, D, F], operands as `quantize_groups` lays
    them out (transposed, groups at `offs_pad_E`)."""
    if not emulated(xq_DW):
        dw = torch._scaled_grouped_mm(
            xq_DW,
            gq_FW.t(),
            sx_ED.flatten(),
            sg_EF.flatten(),
            offs=offs_pad_E,
            out_dtype=torch.bfloat16,
            use_fast_accum=True,
        )
        return dw.to(out_dtype)
    E, W = offs_pad_E.numel(), xq_DW.shape[1]
    col_group = torch.searchsorted(offs_pad_E, torch.arange(W, device=xq_DW.device), right=True)
    col_group = col_group.clamp(max=E - 1)
    with torch.autocast(xq_DW.device.type, enabled=False):
        x_WD = (xq_DW.float() * sx_ED.t().index_select(1, col_group)).t()
        g_WF = (gq_FW.float() * sg_EF.t().index_select(1, col_group)).t()
        return gmm_wgrad(x_WD, g_WF, offs_pad_E, impl).to(out_dtype)


def _record(stats: Fp8Stats | None, name: str, x: Tensor, q: Tensor) -> None:
    if stats is not None:
        stats.record(name, x, q)


class _Fp8GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RD, w_EDF, offs_E, impl, wgrad_sink, grad_divide, pre, stats, name, dw8):
        out_dtype = compute_dtype(x_RD)
        if pre is None:
            xq, sx = fp8.quantize(x_RD)
            _record(stats, f"{name}/x", x_RD, xq)
        else:
            xq, sx = pre
        wq_EFD, sw_EF1 = fp8.quantize_cols(_local(w_EDF))
        ctx.save_for_backward(xq, sx, offs_E)
        ctx.w, ctx.impl, ctx.wgrad_sink, ctx.grad_divide = w_EDF, impl, wgrad_sink, grad_divide
        ctx.x_dtype, ctx.out_dtype, ctx.stats, ctx.name = x_RD.dtype, out_dtype, stats, name
        ctx.dw8 = dw8
        return scaled_grouped_mm(xq, sx, wq_EFD, sw_EF1, offs_E, out_dtype, impl)

    @staticmethod
    def backward(ctx, g_RF):
        xq, sx, offs_E = ctx.saved_tensors
        g_RF = g_RF.to(ctx.out_dtype).contiguous()
        param, divide, impl = ctx.w, ctx.grad_divide, ctx.impl
        dx = None
        if ctx.needs_input_grad[0]:
            gq, sg = fp8.quantize(g_RF)
            _record(ctx.stats, f"{ctx.name}/grad", g_RF, gq)
            wq_EDF, sw_ED1 = fp8.quantize(_local(param))  # scales along F, dX's reduction dim
            dx = scaled_grouped_mm(gq, sg, wq_EDF, sw_ED1, offs_E, ctx.out_dtype, impl)
            dx = dx.to(ctx.x_dtype)
        if not ctx.needs_input_grad[1]:
            return dx, *[None] * 9
        dw8 = ctx.dw8

        def dw_local(x=xq, s=sx, g=g_RF, offs=offs_E) -> Tensor:  # in the GEMM's dtype
            if not dw8:
                return gmm_wgrad(dequantize_rows(x, s, g.dtype), g, offs, impl)
            gid, dest, offs_pad, width = padded_groups(offs, x.shape[0])
            E = offs.numel()
            xq_DW, sx_ED = fp8.quantize_groups(dequantize_rows(x, s, g.dtype), gid, dest, E, width)
            gq_FW, sg_EF = fp8.quantize_groups(g, gid, dest, E, width)
            return scaled_grouped_wgrad(xq_DW, sx_ED, gq_FW, sg_EF, offs_pad, g.dtype, impl)

        return dx, deliver_wgrad(param, dw_local, divide, ctx.wgrad_sink), *[None] * 8


@torch.compiler.disable
def fp8_grouped_linear(
    x_RD: Tensor,
    w_EDF: Tensor,
    offs_E: Tensor,
    impl: str = "grouped",
    wgrad_sink: WgradSink | None = None,
    grad_divide: float = 1.0,
    pre: tuple[Tensor, Tensor] | None = None,
    stats: Fp8Stats | None = None,
    name: str = "experts",
    fp8_wgrad: bool = False,
) -> Tensor:
    """`grouped_linear` in fp8 (see the module docstring for `pre`, `fp8_wgrad`, the recipe)."""
    return _Fp8GroupedLinear.apply(
        x_RD, w_EDF, offs_E, impl, wgrad_sink, grad_divide, pre, stats, name, fp8_wgrad
    )


def dequantize_rows(q_RD: Tensor, s_R1: Tensor, dtype: torch.dtype) -> Tensor:
    """`fp8.dequantize` of rowwise codes [R, D] with scales [R, 1] into `dtype` (a dW's operand
    from x's saved codes: used as is for a bf16 dW, re-quantised for an fp8 one): on CUDA one
    Triton pass, bitwise the same (eager torch makes three full passes through fp32: widen,
    scale, narrow)."""
    if fp8_triton.available(q_RD):
        return fp8_triton.dequantize_rows(q_RD, s_R1, dtype)
    return fp8.dequantize(q_RD, s_R1, dtype)


def _pad_rows(x_MK: Tensor) -> Tensor:
    """x with zero rows appended up to a multiple of ALIGN (fp8 GEMMs reduce over rows here:
    zeros add nothing, and `_scaled_mm` wants the reduction dim aligned)."""
    pad = -x_MK.shape[0] % ALIGN
    return torch.nn.functional.pad(x_MK, (0, 0, 0, pad)) if pad else x_MK


def dense_wgrad_fp8(xq_MK: Tensor, sx_M1: Tensor, g_MN: Tensor, out_dtype: torch.dtype) -> Tensor:
    """dW = g^T x [N, K] in fp8: both operands scaled per feature over the tokens (the GEMM's
    reduction), x re-quantised from its saved rowwise codes (dequantised exactly). No tokens:
    zeros (a [.., 0, N] operand has no columnwise codes to make)."""
    if xq_MK.shape[0] == 0:
        return g_MN.new_zeros(g_MN.shape[1], xq_MK.shape[1], dtype=out_dtype)
    x_MK = _pad_rows(dequantize_rows(xq_MK, sx_M1, g_MN.dtype))
    gq_NM, sg_N1 = fp8.quantize_cols(_pad_rows(g_MN))
    xq_KM, sx_K1 = fp8.quantize_cols(x_MK)
    return scaled_mm(gq_NM, sg_N1, xq_KM, sx_K1, out_dtype)


def linear_forward(x: Tensor, w_NK: Tensor, out_dtype: torch.dtype) -> tuple[Tensor, ...]:
    """The dense fp8 linear's forward: (y [..., N], x's codes [M, K], their scales [M, 1])."""
    x_MK = x.reshape(-1, x.shape[-1])
    xq, sx = fp8.quantize(x_MK)
    wq, sw = fp8.quantize(w_NK)
    y = scaled_mm(xq, sx, wq, sw, out_dtype)
    return y.view(*x.shape[:-1], w_NK.shape[0]), xq, sx


def linear_backward(
    g: Tensor, xq: Tensor, sx: Tensor, w_NK: Tensor, x_dtype: torch.dtype, dw8: bool,
    need: tuple[bool, bool] = (True, True), stats: Fp8Stats | None = None, name: str = "",
) -> tuple[Tensor | None, Tensor | None]:  # fmt: skip
    """(dx, dw) of the dense fp8 linear from the output gradient `g` (in y's dtype), the saved
    codes of x and the weight; `need`: which of the two to compute."""
    g_MN = g.reshape(-1, g.shape[-1]).contiguous()
    dx = dw = None
    if need[0]:
        gq, sg = fp8.quantize(g_MN)
        _record(stats, f"{name}/grad", g_MN, gq)
        wq_KN, sw_K1 = fp8.quantize_cols(w_NK)  # scales along N, dX's reduction dim
        dx = scaled_mm(gq, sg, wq_KN, sw_K1, g_MN.dtype).to(x_dtype)
        dx = dx.view(*g.shape[:-1], w_NK.shape[1])
    if need[1]:
        if dw8:
            dw = cast(dense_wgrad_fp8(xq, sx, g_MN, g_MN.dtype), w_NK.dtype)
        else:
            dw = cast(g_MN.t() @ dequantize_rows(xq, sx, g_MN.dtype), w_NK.dtype)
    return dx, dw


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_NK, stats, name, dw8):
        out_dtype = compute_dtype(x)
        y, xq, sx = linear_forward(x, w_NK, out_dtype)
        _record(stats, f"{name}/x", x.reshape(-1, x.shape[-1]), xq)
        ctx.save_for_backward(xq, sx, w_NK)
        ctx.x_dtype, ctx.out_dtype, ctx.stats, ctx.name = x.dtype, out_dtype, stats, name
        ctx.dw8 = dw8
        return y

    @staticmethod
    def backward(ctx, g):
        xq, sx, w_NK = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        dx, dw = linear_backward(
            g.to(ctx.out_dtype), xq, sx, w_NK, ctx.x_dtype, ctx.dw8, need, ctx.stats, ctx.name
        )
        return dx, dw, None, None, None


@torch.compiler.disable
def fp8_linear(
    x: Tensor, w_NK: Tensor, stats: Fp8Stats | None = None, name: str = "", fp8_wgrad: bool = False
) -> Tensor:
    """x @ w^T (no bias) in fp8: `F.linear`'s contract, any leading dims of x; `fp8_wgrad`:
    dW in fp8 too (`dense_wgrad_fp8`). Runs eagerly (a graph break under torch.compile) and
    records `stats`; inside compiled code `braid.ops.fp8_linear_op` is the same math as an
    operator the compiler keeps whole."""
    return _Fp8Linear.apply(x, w_NK, stats, name, fp8_wgrad)
