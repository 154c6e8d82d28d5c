"""Token dispatcher: sends each token copy to its expert's rank and brings the outputs home.

This file holds the only autograd glue around an exchange (`braid.exchange`): the backward of a
movement is the reverse movement (`Exchange.move` with the splits swapped), uncompressed.

Shape legend: N tokens on this rank, K experts per token, M = N*K token copies, E experts,
W ranks in the expert-parallel group, L = E/W experts per rank, R rows received, D dim, C capacity.

Dispatch (dropless):
  1. sort the M copies by expert id (stable), gather their rows -> x_MD in expert order;
  2. exchange the per-expert counts (W x L), one host sync for the splits;
  3. move rows to their owners; rows arrive grouped [source rank][local expert];
  4. regroup them to [local expert][source rank] so each expert's rows are contiguous.
Dispatch (capacity_factor > 0): each expert takes at most C = ceil(cf*N*K/E) copies from this
rank, earliest tokens first (Switch); rows go into fixed [E, C] slots (empty slots are zero), so
splits are known without a count exchange or a host sync. Capacity applies per rank's batch.
Combine reverses 4, 3 and 1 and sums each token's expert outputs weighted by its gates.
With `send_fp8` (`train.precision=fp8`, set by `braid.parallel.fp8`), dropless steps 1, 3 and
4 gather, send and regroup fp8 rows quantised once per token, and hand the experts `Fp8Rows`
(`braid.moe.fp8_dispatch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from braid.exchange.base import Exchange, LocalExchange
from braid.moe.fp8_dispatch import Fp8Send, dispatch_fp8
from braid.ops.fp8_gemm import Fp8Rows
from braid.ops.permute import (
    combine_tokens,
    expand_tokens,
    inverse_permutation,
    permute_rows,
    regroup_index,
)


@dataclass
class Dispatched:
    """Rows for this rank's experts plus what `combine` needs to send the outputs back."""

    x_RD: Tensor | Fp8Rows  # rows grouped by local expert
    counts_L: Tensor  # rows per local expert (int64)
    order_M: Tensor  # sorted position -> flat copy index (n*K + k)
    token_M: Tensor  # sorted position -> token index
    keep_M: Tensor | None  # capacity mode: copies that fit
    slot_M: Tensor | None  # capacity mode: [E*C] slot of each kept copy
    send_splits: list[int]
    recv_splits: list[int]
    regroup_R: Tensor | None  # dropless, W > 1: received order -> grouped order
    unregroup_R: Tensor | None  # its inverse
    pos_NK: Tensor | None  # dropless: sorted position of copy k of token n (inverse of order_M)
    num_tokens: int
    num_dropped: Tensor  # copies dropped by capacity (scalar)


class _Move(torch.autograd.Function):
    """Forward: `exchange.dispatch` or `.combine`; backward: the exact reverse `move`."""

    @staticmethod
    def forward(ctx, x, exchange, send, recv, direction):
        ctx.exchange, ctx.send, ctx.recv = exchange, send, recv
        go = exchange.dispatch if direction == "dispatch" else exchange.combine
        return go(x.contiguous(), send, recv).wait()

    @staticmethod
    def backward(ctx, g):
        return ctx.exchange.move(g.contiguous(), ctx.recv, ctx.send).wait(), None, None, None, None


class TokenDispatcher:
    def __init__(self, num_experts: int, top_k: int, capacity_factor: float = 0.0):
        self.num_experts, self.top_k, self.capacity_factor = num_experts, top_k, capacity_factor
        self.exchange: Exchange = LocalExchange()
        self.send_fp8: Fp8Send | None = None  # train.precision=fp8 (braid.parallel.fp8)

    @property
    def num_local(self) -> int:
        return self.num_experts // self.exchange.size

    def capacity(self, num_tokens: int) -> int:
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def dispatch(self, x_ND: Tensor, topk_idx_NK: Tensor) -> Dispatched:
        N, K, E, W, L = (
            x_ND.shape[0],
            self.top_k,
            self.num_experts,
            self.exchange.size,
            self.num_local,
        )
        flat_M = topk_idx_NK.flatten()
        sorted_e_M, order_M = torch.sort(flat_M, stable=True)
        token_M = order_M // K
        # scatter_add, not bincount: a fixed-size result keeps torch.compile graphs whole.
        counts_E = torch.zeros(E, dtype=torch.long, device=flat_M.device).scatter_add_(
            0, flat_M, torch.ones_like(flat_M)
        )
        if self.capacity_factor > 0:
            return self._dispatch_capacity(x_ND, sorted_e_M, order_M, token_M, counts_E)

        pos_NK = inverse_permutation(order_M).view(N, K)
        if W == 1:
            if self.send_fp8 is not None:  # the gather emits fp8 (quantised per token)
                x_MD = dispatch_fp8(
                    x_ND, token_M, pos_NK, self.exchange, [], [], None, None, self.send_fp8
                )
            else:
                x_MD = expand_tokens(x_ND, token_M, pos_NK)  # backward: a gather, no atomics
            return Dispatched(
                x_MD,
                counts_E,
                order_M,
                token_M,
                None,
                None,
                [],
                [],
                None,
                None,
                pos_NK,
                N,
                x_ND.new_zeros((), dtype=torch.long),
            )
        recv_WL = self.exchange.exchange_counts(counts_E.view(W, L))
        # One host sync: the splits of both directions must be known on the host.
        sizes = torch.cat([counts_E.view(W, L).sum(1), recv_WL.sum(1)]).tolist()
        send, recv = sizes[:W], sizes[W:]
        regroup_R = regroup_index(recv_WL, sum(recv))
        unregroup_R = inverse_permutation(regroup_R)
        if self.send_fp8 is not None:
            x_RD = dispatch_fp8(x_ND, token_M, pos_NK, self.exchange, send, recv, regroup_R,
                                unregroup_R, self.send_fp8)
        else:
            x_MD = expand_tokens(x_ND, token_M, pos_NK)  # backward: a gather, no atomics
            x_RD = _Move.apply(x_MD, self.exchange, send, recv, "dispatch")
            x_RD = permute_rows(x_RD, regroup_R, unregroup_R)
        return Dispatched(
            x_RD,
            recv_WL.sum(0),
            order_M,
            token_M,
            None,
            None,
            send,
            recv,
            regroup_R,
            unregroup_R,
            pos_NK,
            N,
            x_ND.new_zeros((), dtype=torch.long),
        )

    def _dispatch_capacity(self, x_ND, sorted_e_M, order_M, token_M, counts_E) -> Dispatched:
        N, E, W, L = x_ND.shape[0], self.num_experts, self.exchange.size, self.num_local
        C = self.capacity(N)
        start_E = torch.cumsum(counts_E, 0) - counts_E
        pos_M = torch.arange(sorted_e_M.numel(), device=x_ND.device) - start_E[sorted_e_M]
        keep_M = pos_M < C
        slot_M = (sorted_e_M * C + pos_M)[keep_M]
        buf = x_ND.new_zeros(E * C, x_ND.shape[1])
        buf = buf.index_copy(0, slot_M, x_ND.index_select(0, token_M[keep_M]))
        splits = [L * C] * W
        if W > 1:
            buf = _Move.apply(buf, self.exchange, splits, splits, "dispatch")
        # Received [W, L, C] -> grouped by local expert [L, W*C].
        x_RD = buf.view(W, L, C, -1).transpose(0, 1).reshape(L * W * C, -1)
        counts_L = torch.full((L,), W * C, dtype=torch.long, device=x_ND.device)
        dropped = (~keep_M).sum()
        return Dispatched(
            x_RD,
            counts_L,
            order_M,
            token_M,
            keep_M,
            slot_M,
            splits,
            splits,
            None,
            None,
            None,
            N,
            dropped,
        )

    def combine(self, y_RD: Tensor, gates_NK: Tensor, d: Dispatched) -> Tensor:
        W, L, D = self.exchange.size, self.num_local, y_RD.shape[-1]
        if d.keep_M is None:  # dropless: K copies per token, gathered back (no atomics)
            if d.regroup_R is not None:
                y_RD = permute_rows(y_RD, d.unregroup_R, d.regroup_R)
                y_RD = _Move.apply(y_RD, self.exchange, d.recv_splits, d.send_splits, "combine")
            return combine_tokens(y_RD, gates_NK, d.pos_NK, d.order_M)
        w_M = gates_NK.flatten().index_select(0, d.order_M).to(y_RD.dtype)
        C = y_RD.shape[0] // max(W * L, 1)
        buf = y_RD.view(L, W, C, D).transpose(0, 1).reshape(W * L * C, D)
        if W > 1:
            buf = _Move.apply(buf, self.exchange, d.recv_splits, d.send_splits, "combine")
        y_MD = buf.index_select(0, d.slot_M) * w_M[d.keep_M, None]
        out = y_MD.new_zeros(d.num_tokens, D)
        return out.index_add(0, d.token_M[d.keep_M], y_MD)

