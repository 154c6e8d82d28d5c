"""Quantise once, send fp8: the dropless dispatch of `train.precision=fp8`.

Forward, per token (not per copy):
  1. quantise the N token rows rowwise (`braid.ops.fp8`, power-of-two scales) and pack them in
     the `fp8` compressor's wire format: D code bytes, then the fp32 scale (gloo has no fp8
     collectives, so everything travels as uint8);
  2. gather the K copies of each token in expert order from the packed rows: the permutation
     moves 1-byte codes, and quantisation ran over N rows, not N*K;
  3. through any exchange but the local one, move the packed rows to the experts' ranks (the
     simulated exchange times their bytes) and regroup them by local expert;
  4. hand the experts `Fp8Rows` (codes, scales, an autograd anchor), never decoded.
Rowwise scales depend on the row alone, so the codes equal those of quantising each copy where
it lands: EP results equal the single-process ones, and the experts' own quantiser (used when
rows arrive in the compute dtype: capacity mode, the overlap pipeline) gives the same numbers.
Backward (the anchor's gradient is dX of the received rows): un-regroup, the exact reverse
movement of the bf16 gradient, and the sum of each token's K copies (a gather, no atomics):
straight through the quantisation, like every compressor (`braid.exchange.compress.base`).
The combine direction stays in the compute dtype: expert outputs enter the residual stream,
where e4m3's 4 significant bits would add error with no scale to adapt.
Shapes: N tokens, K copies per token, M = N*K rows sent, R rows received, D row width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from braid.exchange.base import Exchange, LocalExchange
from braid.exchange.compress.fp8 import Fp8Compressor
from braid.exchange.compress.wrap import CompressedExchange
from braid.exchange.config import ExchangeConfig
from braid.ops import fp8
from braid.ops.fp8_gemm import Fp8Rows
from braid.ops.fp8_stats import Fp8Stats
from braid.ops.permute import sum_copies

ROWWISE = Fp8Compressor(ExchangeConfig(scale_block=0))  # one scale per row: the GEMM's scales


@dataclass
class Fp8Send:
    """A dispatcher's fp8 setting (`braid.parallel.fp8`): where the numerics of the rows it
    quantises are recorded, under the name of the first expert GEMM's input."""

    stats: Fp8Stats | None = None
    name: str = "experts.w13"


class _Fp8Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, token_M, pos_NK, exchange, send, recv, regroup_R, unregroup_R, rec):
        D = x_ND.shape[1]
        moves = not isinstance(exchange, LocalExchange)  # a real (or simulated) exchange
        if moves:
            p_NB = ROWWISE.encode(x_ND)
            if rec.stats is not None:
                rec.stats.record(f"{rec.name}/x", x_ND, ROWWISE.unpack(p_NB, D)[0])
            p_MB = p_NB.index_select(0, token_M)  # 1, 2
            # 3; a compressing wrapper is bypassed: these rows are fp8 already
            transport = exchange.inner if isinstance(exchange, CompressedExchange) else exchange
            p_MB = transport.dispatch(p_MB, send, recv).wait()
            if regroup_R is not None:
                p_MB = p_MB.index_select(0, regroup_R)
            q_RD, s_R1 = ROWWISE.unpack(p_MB, D)
            q_RD = q_RD.contiguous()  # fp8 GEMMs want dense, 16-byte aligned rows
        else:  # the local exchange: nothing to pack (same codes; a graph torch.compile keeps)
            q_ND, s_N1 = fp8.quantize(x_ND)
            if rec.stats is not None:
                rec.stats.record(f"{rec.name}/x", x_ND, q_ND)
            q_RD = q_ND.view(torch.uint8).index_select(0, token_M).view(fp8.E4M3)
            s_R1 = s_N1.index_select(0, token_M)
        ctx.exchange, ctx.send, ctx.recv, ctx.moves = exchange, send, recv, moves
        ctx.save_for_backward(pos_NK, unregroup_R)
        ctx.mark_non_differentiable(q_RD, s_R1)
        return x_ND.new_zeros(()).expand(q_RD.shape[0], D), q_RD, s_R1

    @staticmethod
    def backward(ctx, g_RD, _gq, _gs):
        pos_NK, unregroup_R = ctx.saved_tensors
        if unregroup_R is not None:
            g_RD = g_RD.index_select(0, unregroup_R)
        if ctx.moves:
            g_RD = ctx.exchange.move(g_RD.contiguous(), ctx.recv, ctx.send).wait()
        return sum_copies(g_RD, pos_NK), *[None] * 8


@torch.compiler.disable  # eager under torch.compile, as the fp8 GEMMs (braid.ops.fp8_gemm)
def dispatch_fp8(
    x_ND: Tensor,
    token_M: Tensor,
    pos_NK: Tensor,
    exchange: Exchange,
    send: list[int],
    recv: list[int],
    regroup_R: Tensor | None,
    unregroup_R: Tensor | None,
    setting: Fp8Send | None = None,
) -> Fp8Rows:
    """Dropless dispatch of x_ND's copies `token_M` (sorted by expert) as fp8 rows."""
    rec = setting or Fp8Send()  # recorded while active: this frame always runs eagerly
    anchor, q, s = _Fp8Dispatch.apply(
        x_ND, token_M, pos_NK, exchange, send, recv, regroup_R, unregroup_R, rec
    )
    return Fp8Rows(q, s, anchor)
