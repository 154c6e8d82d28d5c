"""Quantise once, send fp8: the dispatch movement of `train.precision=fp8`.

The rows are quantised rowwise (`braid.ops.fp8`, power-of-two scales) on the sending rank, move
as packed uint8 rows in the `fp8` compressor's wire format (D code bytes, then the fp32 scale;
gloo has no fp8 collectives), are regrouped by local expert, and reach the expert GEMM as
codes plus scales (`Fp8Rows`), never decoded: the exchange moves about half of bf16's bytes
and nothing is quantised twice. Quantising a row before or after a move gives the same codes
(rowwise scales depend on the row alone), so EP results equal the single-process ones, where
the experts quantise the same rows themselves.
The backward is the exact reverse movement of the bf16 gradient (as `_Move` in the dispatcher):
straight through the quantisation, like every compressor (`braid.exchange.compress.base`).
The combine direction stays in the compute dtype: the expert outputs are summed with the gates
at home, where e4m3's 4 significant bits would add error to the residual stream directly.
Shapes: M rows sent, R rows received, D row width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from braid.exchange.base import Exchange
from braid.exchange.compress.fp8 import Fp8Compressor
from braid.exchange.compress.wrap import CompressedExchange
from braid.exchange.config import ExchangeConfig
from braid.ops.fp8_gemm import Fp8Rows

ROWWISE = Fp8Compressor(ExchangeConfig(scale_block=0))  # one scale per row: the GEMM's scales


class _Fp8Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MD, exchange, send, recv, regroup_R, unregroup_R):
        D = x_MD.shape[1]
        transport = exchange.inner if isinstance(exchange, CompressedExchange) else exchange
        p_RB = transport.dispatch(ROWWISE.encode(x_MD), send, recv).wait()
        if regroup_R is not None:
            p_RB = p_RB.index_select(0, regroup_R)
        q_RD, s_R1 = ROWWISE.unpack(p_RB, D)
        q_RD = q_RD.contiguous()  # fp8 GEMMs want dense, 16-byte aligned rows
        ctx.exchange, ctx.send, ctx.recv = exchange, send, recv
        ctx.save_for_backward(unregroup_R)
        anchor_RD = x_MD.new_zeros(()).expand(q_RD.shape[0], D)
        ctx.mark_non_differentiable(q_RD, s_R1)
        return anchor_RD, q_RD, s_R1

    @staticmethod
    def backward(ctx, g_RD, _gq, _gs):
        (unregroup_R,) = ctx.saved_tensors
        if unregroup_R is not None:
            g_RD = g_RD.index_select(0, unregroup_R)
        g_MD = ctx.exchange.move(g_RD.contiguous(), ctx.recv, ctx.send).wait()
        return g_MD, None, None, None, None, None


def dispatch_fp8(
    x_MD: Tensor,
    exchange: Exchange,
    send: list[int],
    recv: list[int],
    regroup_R: Tensor | None,
    unregroup_R: Tensor | None,
) -> Fp8Rows:
    """Quantise x_MD, move it like `exchange.dispatch`, regroup by `regroup_R` (if any)."""
    anchor, q, s = _Fp8Dispatch.apply(x_MD, exchange, send, recv, regroup_R, unregroup_R)
    return Fp8Rows(q, s, anchor)
