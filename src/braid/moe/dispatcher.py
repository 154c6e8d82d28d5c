"""Token dispatcher: sends each token copy to its expert's rank and brings the outputs home.

The one place that knows how routed tokens travel. It offers the MoE layer two ways to use the
same primitives (`braid.moe.layer` reads as the specification of both):
  plan     -> `Plan`: per chunk (a range of tokens, or of each rank's local experts), its
              copies sorted by expert, counts exchanged (all chunks at once) and the splits
              read on the host; capacity decided over the batch;
  plain    -> `dispatch(x_ND, route)` / `combine(y_RD, gates_NK, route)`: autograd ops (the
              exchange is waited at once, its backward is the exact reverse `move`);
  chunked  -> for the overlap engine, autograd-free steps per `Route` that return handles:
              `send_rows` -> `issue_dispatch` -> `to_experts` ... `from_experts` ->
              `issue_combine` -> `finish`, and in backward `combine_grad` -> `issue_back` ->
              `finish_grad`. The engine (`braid.overlap.pipeline`) only schedules these.
This file holds the only autograd glue around an exchange (`braid.exchange`).

Shape legend: N tokens on this rank, K experts per token, M kept token copies of a chunk (N*K
when dropless), E experts, W ranks in the expert-parallel group, L = E/W experts per rank,
R rows received, D dim.

Plan (per chunk of tokens [start, stop)):
  1. sort the chunk's copies by expert id (stable); in capacity mode keep only the copies that
     fit: each expert takes at most C = ceil(cf*N*K/E) copies of this rank's batch, earliest
     tokens first (Switch), decided over the whole batch so chunking never changes it;
  2. count rows per expert (`count_per_expert`, the one counting function) and exchange the
     counts of every chunk in one [W, C*L] all-to-all; one host sync gives every split.
Dispatch: gather the kept copies in expert order (x_MD), move them to their owners (rows arrive
grouped [source rank][local expert]), regroup to [local expert][source rank].
Combine reverses those steps and sums each token's expert outputs weighted by its gates.
With one rank (the local exchange) nothing is counted across ranks and, dropless, no host sync
is needed: the splits follow from the shapes. The simulated exchange stands in for several
ranks: its plans exchange counts (one latency) and read the splits on the host as theirs do.
With `send_fp8` (`train.precision=fp8`, set by `braid.parallel.fp8`), the plain dropless
dispatch gathers, sends and regroups fp8 rows quantised once per token and hands the experts
`Fp8Rows` (`braid.moe.fp8_dispatch`); the chunked path moves rows in x's dtype and the experts
quantise them on arrival (the same codes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from braid.exchange.base import Exchange, Handle, LocalExchange, receive_into
from braid.moe.fp8_dispatch import Fp8Send, dispatch_fp8
from braid.ops.fp8_gemm import Fp8Rows
from braid.ops.grouped_gemm import compute_dtype
from braid.ops.permute import (
    combine_rows,
    combine_rows_grad,
    combine_tokens,
    expand_tokens,
    expert_bounds,
    gather_rows,
    inverse_permutation,
    permute_rows,
    regroup_index,
    sum_copies,
    token_bounds,
)


@dataclass(frozen=True, kw_only=True)
class Route:
    """How the tokens [start, stop) of this rank travel to their experts and back."""

    start: int
    stop: int
    order_M: Tensor  # sorted position -> flat copy index in the chunk (n*K + k), kept copies
    token_M: Tensor  # sorted position -> token index in the chunk
    pos_NK: Tensor | None  # dropless: sorted position of copy k of token n (inverse of order_M)
    send: list[int]  # rows to each rank
    recv: list[int]  # rows from each rank
    counts_L: Tensor  # received rows per local expert (int64)
    regroup_R: Tensor | None  # W > 1: received [rank][expert] order -> [expert][rank]
    unregroup_R: Tensor | None  # its inverse
    part: tuple[int, int] | None = None  # a chunk of experts: local experts [lo, hi) only
    rows: tuple[int, int] | None = None  # ... and its copies [a, b) of the plan's `whole`


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Every chunk's route, and the copies dropped by capacity on this rank (scalar). Chunks of
    experts also have `whole`: one route over all the copies, in the chunks' order (a token's
    copies are spread over the chunks, so its output is summed once, over `whole`)."""

    routes: list[Route]
    num_dropped: Tensor
    whole: Route | None = None


def count_per_expert(expert_M: Tensor, num_experts: int) -> Tensor:
    """Copies per expert (int64 [E]). scatter_add, not bincount: a fixed-size result keeps
    torch.compile graphs whole. Every count of the dispatcher goes through here."""
    out = torch.zeros(num_experts, dtype=torch.long, device=expert_M.device)
    return out.scatter_add_(0, expert_M, torch.ones_like(expert_M))


def _fused(t: Tensor) -> bool:
    """Whether the chunked path may use the compiled one-pass permutation kernels for `t`: on
    CUDA outside a compiled region (inside one, the compiler fuses the plain expressions); the
    callers add "when training", as the plain path's autograd ops do (their defaults)."""
    return t.is_cuda and not torch.compiler.is_compiling()


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
        self._keys: dict[tuple, Tensor] = {}  # chunks of experts: sort keys, chunk of each slot

    @property
    def num_local(self) -> int:
        return self.num_experts // self.exchange.size

    @property
    def traffic_ranks(self) -> int:
        """Ranks the exchange's traffic spans (`Exchange.traffic_ranks`; `size` for an exchange
        without it): the simulated exchange's one process stands for `simulate_ranks`."""
        return max(1, getattr(self.exchange, "traffic_ranks", self.exchange.size))

    @property
    def chunk_local(self) -> int:
        """Experts per rank of that group: how many a chunk of experts may divide
        (`overlap.chunk_by`). `num_local` but for the simulated exchange, whose one process
        holds all E experts while it stands for ranks of E / W each."""
        return self.num_experts // self.traffic_ranks

    def capacity(self, num_tokens: int) -> int:
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    # -- plan ------------------------------------------------------------------------------

    def plan(self, topk_idx_NK: Tensor, num_chunks: int = 1, by: str = "tokens") -> Plan:
        """Routes of `num_chunks` chunks (one count exchange, one host sync): contiguous ranges
        of the tokens (`by="tokens"`), or of each rank's local experts (`by="experts"`)."""
        N, K = topk_idx_NK.shape
        E, W, L, dev = self.num_experts, self.exchange.size, self.num_local, topk_idx_NK.device
        keep_NK = None
        dropped = torch.zeros((), dtype=torch.long, device=dev)
        if self.capacity_factor > 0:
            keep_NK, dropped = self._within_capacity(topk_idx_NK)
        if by == "experts" and num_chunks > 1:
            return self._plan_experts(topk_idx_NK, num_chunks, keep_NK, dropped)
        parts, counts = [], []
        for a, b in token_bounds(N, num_chunks):
            sorted_e, order = torch.sort(topk_idx_NK[a:b].flatten(), stable=True)
            if keep_NK is not None:
                fits = keep_NK[a * K : b * K].index_select(0, order)
                sorted_e, order = sorted_e[fits], order[fits]
            parts.append((a, b, order))
            counts.append(count_per_expert(sorted_e, E))
        C = num_chunks
        send_CWL = torch.stack(counts).view(C, W, L)
        if not self._counted():
            recv_WCL = send_CWL.transpose(0, 1)
            # Dropless: M = N*K per chunk, known from the shapes (no host sync).
            sizes = [(b - a) * K for a, b, _ in parts] if keep_NK is None else None
        else:
            recv_WCL = self.exchange.exchange_counts(
                send_CWL.transpose(0, 1).reshape(W, C * L)
            ).view(W, C, L)
            sizes = None
        if sizes is None:  # one host sync: every chunk's splits, both directions
            both = torch.cat([send_CWL.sum(2).flatten(), recv_WCL.sum(2).t().flatten()])
            both = both.tolist()
        routes = []
        for c, (a, b, order) in enumerate(parts):
            if sizes is not None:
                send = recv = [sizes[c]]
            else:
                send, recv = both[c * W : (c + 1) * W], both[(C + c) * W :][:W]
            recv_WL = recv_WCL[:, c]
            regroup = regroup_index(recv_WL, sum(recv)) if W > 1 else None
            routes.append(
                Route(
                    start=a,
                    stop=b,
                    order_M=order,
                    token_M=order // K,
                    pos_NK=inverse_permutation(order).view(b - a, K) if keep_NK is None else None,
                    send=send,
                    recv=recv,
                    counts_L=recv_WL.sum(0),
                    regroup_R=regroup,
                    unregroup_R=inverse_permutation(regroup) if regroup is not None else None,
                )
            )
        return Plan(routes=routes, num_dropped=dropped)

    def _plan_experts(
        self, topk_idx_NK: Tensor, num_chunks: int, keep_NK: Tensor | None, dropped: Tensor
    ) -> Plan:
        """Chunk c holds the copies routed to local experts [lo, hi) of every rank (the same
        slots on each), all tokens: each expert's rows meet in one chunk, so its GEMMs see
        the plain path's rows and its dW is computed once. The copies are sorted by (chunk,
        rank, expert), so a chunk's rows are contiguous and `whole` is their concatenation.
        The row count of each chunk is data, so this plan always syncs with the host once."""
        N, K = topk_idx_NK.shape
        E, W, L, dev = self.num_experts, self.exchange.size, self.num_local, topk_idx_NK.device
        parts = expert_bounds(L, num_chunks)  # local expert slots of each chunk
        key_E = self._keys.get((num_chunks, W, dev))
        if key_E is None:  # each expert's sort key: (chunk, rank, slot)
            slot_chunk = torch.zeros(L, dtype=torch.long)
            for c, (lo, hi) in enumerate(parts):
                slot_chunk[lo:hi] = c
            e = torch.arange(E)
            key_E = ((slot_chunk[e % L] * W + e // L) * L + e % L).to(dev)
            self._keys[(num_chunks, W, dev)] = key_E
        _, order = torch.sort(key_E[topk_idx_NK.flatten()], stable=True)
        if keep_NK is not None:
            order = order[keep_NK.index_select(0, order)]
        send_WL = count_per_expert(topk_idx_NK.flatten().index_select(0, order), E).view(W, L)
        recv_WL = self.exchange.exchange_counts(send_WL) if self._counted() else send_WL
        C, routes, a = num_chunks, [], 0
        # Every chunk's rows to and from each rank in one reduction: [2, W, C] (a few small
        # kernels per layer, not a few per chunk: chunked steps are launch-bound).
        chunk_L = self._keys.get(("chunk", num_chunks, L, dev))
        if chunk_L is None:  # each local expert slot's chunk
            chunk_L = torch.tensor([c for c, (lo, hi) in enumerate(parts) for _ in range(lo, hi)])
            chunk_L = self._keys[("chunk", num_chunks, L, dev)] = chunk_L.to(dev)
        sums = torch.zeros(2, W, C, dtype=send_WL.dtype, device=dev)
        sums.index_add_(2, chunk_L, torch.stack([send_WL, recv_WL]))
        both = sums.tolist()  # the one host sync: every chunk's splits
        token_M, counts_L = order // K, recv_WL.sum(0)  # sliced per chunk below (views)
        for c, (lo, hi) in enumerate(parts):
            send, recv = [r[c] for r in both[0]], [r[c] for r in both[1]]
            b = a + sum(send)
            regroup = regroup_index(recv_WL[:, lo:hi], sum(recv)) if W > 1 else None
            routes.append(
                Route(
                    start=0,
                    stop=N,
                    order_M=order[a:b],
                    token_M=token_M[a:b],
                    pos_NK=None,
                    send=send,
                    recv=recv,
                    counts_L=counts_L[lo:hi],
                    regroup_R=regroup,
                    unregroup_R=inverse_permutation(regroup) if regroup is not None else None,
                    part=(lo, hi),
                    rows=(a, b),
                )
            )
            a = b
        whole = Route(
            start=0,
            stop=N,
            order_M=order,
            token_M=token_M,
            pos_NK=inverse_permutation(order).view(N, K) if keep_NK is None else None,
            send=[a],
            recv=[a],
            counts_L=counts_L,
            regroup_R=None,
            unregroup_R=None,
        )
        return Plan(routes=routes, num_dropped=dropped, whole=whole)

    def _counted(self) -> bool:
        """Whether a plan exchanges counts and reads the splits on the host: when the traffic
        spans several ranks (`Exchange.traffic_ranks`). The simulated exchange counts the
        ranks it stands in for, so one GPU pays the count exchange and the host read that a
        real group's dispatch pays, in every mode (and `exchange_counts` returns the counts
        unchanged there: one rank's are all of them)."""
        return self.traffic_ranks > 1

    def _within_capacity(self, topk_idx_NK: Tensor) -> tuple[Tensor, Tensor]:
        """(keep_NK flat: copies that fit their expert's capacity, number dropped)."""
        sorted_e, order = torch.sort(topk_idx_NK.flatten(), stable=True)
        counts_E = count_per_expert(sorted_e, self.num_experts)
        first_E = torch.cumsum(counts_E, 0) - counts_E
        rank_M = torch.arange(sorted_e.numel(), device=sorted_e.device) - first_E[sorted_e]
        fits = rank_M < self.capacity(topk_idx_NK.shape[0])
        return torch.empty_like(fits).scatter_(0, order, fits), (~fits).sum()

    # -- the plain path: autograd ops ------------------------------------------------------

    def dispatch(self, x_ND: Tensor, route: Route) -> Tensor | Fp8Rows:
        """Rows for this rank's experts, grouped by local expert (autograd op)."""
        x_ND = x_ND[route.start : route.stop]
        if self.send_fp8 is not None and route.pos_NK is not None:  # quantise once, send fp8
            return dispatch_fp8(
                x_ND,
                route.token_M,
                route.pos_NK,
                self.exchange,
                route.send,
                route.recv,
                route.regroup_R,
                route.unregroup_R,
                self.send_fp8,
            )
        if route.pos_NK is not None:
            # Gathered straight into the GEMMs' dtype; backward: a gather, no atomics.
            x_MD = expand_tokens(x_ND, route.token_M, route.pos_NK, compute_dtype(x_ND))
        else:
            x_MD = x_ND.index_select(0, route.token_M)
        x_RD = _Move.apply(x_MD, self.exchange, route.send, route.recv, "dispatch")
        return self.to_experts(x_RD, route)

    def combine(self, y_RD: Tensor, gates_NK: Tensor, route: Route) -> Tensor:
        """Each token's expert outputs back home, weighted by its gates and summed (autograd)."""
        y_RD = self.from_experts(y_RD, route)
        y_MD = _Move.apply(y_RD, self.exchange, route.recv, route.send, "combine")
        gates_NK = gates_NK[route.start : route.stop]
        if route.pos_NK is not None:  # K copies per token, gathered back (no atomics)
            return combine_tokens(y_MD, gates_NK, route.pos_NK, route.order_M)
        w_M = gates_NK.flatten().index_select(0, route.order_M).to(y_MD.dtype)
        out = y_MD.new_zeros(route.stop - route.start, y_MD.shape[1])
        return out.index_add(0, route.token_M, y_MD * w_M[:, None])

    # -- both paths: the expert-side permutation (autograd ops) ----------------------------

    def to_experts(self, x_RD: Tensor, route: Route) -> Tensor:
        """Received rows [source rank][local expert] -> grouped by local expert."""
        if route.regroup_R is None:
            return x_RD
        return permute_rows(x_RD, route.regroup_R, route.unregroup_R)

    def from_experts(self, y_RD: Tensor, route: Route) -> Tensor:
        """The inverse of `to_experts`: rows back in received order, ready to go home."""
        if route.unregroup_R is None:
            return y_RD
        return permute_rows(y_RD, route.unregroup_R, route.regroup_R)

    # -- the chunked path: autograd-free steps that return handles -------------------------

    def send_rows(self, x_ND: Tensor, route: Route, train: bool = True) -> Tensor:
        """The chunk's kept copies in expert order (the dispatch payload). Dropless, in the
        GEMMs' dtype as the plain path sends them (gathered and cast in one pass on CUDA when
        `train`, as the plain path's `expand_tokens`); with fp8 sends, in x's own dtype, so the
        experts quantise the same values as the plain path's fp8 dispatch (the same codes)."""
        x_ND = x_ND[route.start : route.stop]
        if (route.pos_NK is None and route.part is None) or self.send_fp8 is not None:
            return x_ND.index_select(0, route.token_M)
        fused = train and _fused(x_ND)
        return gather_rows(x_ND, route.token_M, compute_dtype(x_ND), fused=fused)

    def issue_dispatch(self, x_MD: Tensor, route: Route) -> Handle:
        return self.exchange.dispatch(x_MD, route.send, route.recv)

    def issue_combine(self, y_RD: Tensor, route: Route, out: Tensor | None = None) -> Handle:
        """`y_RD` in received order (after `from_experts`) goes home (into `out`, if given:
        the exchange's `combine_into`, `braid.exchange.base.receive_into`)."""
        if out is not None:
            return receive_into(self.exchange, "combine", y_RD, route.recv, route.send, out)
        return self.exchange.combine(y_RD, route.recv, route.send)

    def finish(self, y_MD: Tensor, gates_NK: Tensor, route: Route, train: bool = True) -> Tensor:
        """The chunk's output [stop-start, D]: the plain path's `combine` arithmetic."""
        gates_NK = gates_NK[route.start : route.stop]
        if route.pos_NK is not None:  # the plain path's kernels (`combine_tokens`)
            return combine_rows(y_MD, gates_NK, route.pos_NK, fused=train and _fused(y_MD))
        w_M = gates_NK.flatten().index_select(0, route.order_M).to(y_MD.dtype)
        out = y_MD.new_zeros(route.stop - route.start, y_MD.shape[1])
        return out.index_add(0, route.token_M, y_MD * w_M[:, None])

    def combine_grad(
        self, g_ND: Tensor, y_MD: Tensor, gates_NK: Tensor, route: Route
    ) -> tuple[Tensor, Tensor]:
        """Backward of `finish` for the chunk: (grad of y_MD, to send back to the experts;
        grad of the chunk's gates [stop-start, K])."""
        K = self.top_k
        gates_NK, g_ND = gates_NK[route.start : route.stop], g_ND[route.start : route.stop]
        if route.pos_NK is not None:  # the plain path's kernels (`combine_tokens`' backward)
            return combine_rows_grad(
                y_MD, gates_NK, route.pos_NK, route.order_M, g_ND, fused=_fused(y_MD)
            )
        g_MD = g_ND.index_select(0, route.token_M)
        g_w = (g_MD * y_MD).sum(1).to(gates_NK.dtype)
        dgates = g_w.new_zeros((route.stop - route.start) * K).index_add_(0, route.order_M, g_w)
        w_M = gates_NK.flatten().index_select(0, route.order_M).to(y_MD.dtype)
        return g_MD * w_M[:, None], dgates.view(-1, K)

    def issue_back(
        self, g_RD: Tensor, route: Route, toward: str, out: Tensor | None = None
    ) -> Handle:
        """The exact reverse movement of a gradient: toward "experts" (combine's backward) or
        "home" (dispatch's backward); into `out`, if given (the exchange's `move_into`)."""
        send, recv = (route.send, route.recv) if toward == "experts" else (route.recv, route.send)
        if out is not None:
            return receive_into(self.exchange, "move", g_RD, send, recv, out)
        return self.exchange.move(g_RD, send, recv)

    def finish_grad(self, g_MD: Tensor, route: Route, dtype: torch.dtype) -> Tensor:
        """Backward of `send_rows`: the chunk's input grad [stop-start, D] from its copies."""
        if route.pos_NK is not None:
            return sum_copies(g_MD, route.pos_NK, dtype)  # in fp32 for bf16 rows, rounded once
        dx = g_MD.new_zeros(route.stop - route.start, g_MD.shape[1], dtype=dtype)
        return dx.index_add_(0, route.token_M, g_MD.to(dtype))
