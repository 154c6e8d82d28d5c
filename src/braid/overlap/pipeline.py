"""Chunked MoE pipeline: steps 2-5 of `MoE.forward` as C token chunks whose exchanges overlap.

Job: the same result as dispatch -> experts -> combine (+ shared) of `braid.moe`, with the
exchange of one chunk in flight while another chunk's experts run, in forward and backward.

Design (Tutel / PlanMoE, token chunks): the N tokens of this rank are cut into C contiguous
ranges (sizes differ by at most one; a range may be empty, since C must match on every rank
while N may not). Each chunk is an independent dispatch -> experts -> combine over its tokens,
so per token the arithmetic is the plain path's (rows sorted by expert, the K outputs of a token
summed in expert order); only the grouping of rows into GEMM calls differs. Every chunk's
counts travel in one count exchange ([W, C*L]: the exchange's all-to-all over dim 0) and one
host sync. Capacity mode decides which copies fit over the whole batch first (as the
dispatcher does), then moves only the kept rows.

Autograd: one Function spans the region. Its forward runs the schedule below and keeps, per
chunk, a small expert-side graph (received rows -> regroup -> experts -> un-regroup) built under
enable_grad; token-side permutations are done by hand as gathers (`braid.ops.permute`; the
index_add scatter only in capacity mode, where a token may have fewer than K copies), so nothing
is kept that the plain path frees. Its backward replays the schedule in
reverse, calling torch.autograd.backward on each chunk's graph.

Phases (forward; D = dispatch exchange, E = experts, B = combine exchange, S = shared experts):
  issue D0; S (overlaps D0);
  for c: issue D[c+1]; wait D[c]; E[c]; issue B[c]; wait B[c-1], finish c-1
  wait B[C-1], finish C-1.
Backward mirrors it (Bg/Dg: the gradient exchanges, straight-through `move`):
  issue Bg0; S backward (overlaps Bg0);
  for c: issue Bg[c+1]; wait Bg[c]; E[c] backward (dX; dW queued when split_dw); issue Dg[c];
         wait Dg[c-1], finish c-1
  wait Dg[C-1], finish C-1.
Every wait first drains the layer's dW queue while the exchange is in flight.

Shape legend: N tokens, K experts per token, D dim, E experts, W EP ranks, L = E/W, M copies,
R rows received, C chunks. The dispatcher and experts are duck-typed (no `braid.moe` import).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from braid.ops.permute import (
    inverse_permutation,
    permute_rows,
    regroup_index,
    sum_copies,
    weighted_sum,
)
from braid.ops.swiglu import gated
from braid.overlap.streams import Clock
from braid.overlap.timeline import LayerTimeline
from braid.overlap.wgrad import WgradQueue, flush_point, swiglu_split_dw


@dataclass
class Chunk:
    a: int  # first token
    b: int  # one past the last token
    order_M: Tensor  # sorted position -> flat copy index in the chunk (n*K + k); kept copies
    token_M: Tensor  # sorted position -> token index in the chunk
    send: list[int]  # rows to each rank
    recv: list[int]  # rows from each rank
    counts_L: Tensor  # received rows per local expert
    regroup_R: Tensor | None  # received [rank][expert] order -> [expert][rank] (W > 1)
    unregroup_R: Tensor | None
    pos_NK: Tensor | None  # dropless: sorted position of copy k of token n (inverse of order_M)


def token_bounds(num_tokens: int, num_chunks: int) -> list[tuple[int, int]]:
    """C contiguous ranges covering [0, N), sizes differing by at most one (some may be empty)."""
    q, r = divmod(num_tokens, num_chunks)
    sizes = [q + (c < r) for c in range(num_chunks)]
    starts = [sum(sizes[:c]) for c in range(num_chunks)]
    return [(s, s + n) for s, n in zip(starts, sizes, strict=True)]


def plan_chunks(topk_NK: Tensor, num_chunks: int, dispatcher: Any) -> tuple[list[Chunk], Tensor]:
    """Sort each chunk's copies by expert, exchange all counts at once; (chunks, num_dropped)."""
    N, K = topk_NK.shape
    E, W = dispatcher.num_experts, dispatcher.exchange.size
    L, dev = E // W, topk_NK.device
    keep_M, dropped = None, torch.zeros((), dtype=torch.long, device=dev)
    if dispatcher.capacity_factor > 0:  # the dispatcher's rule, over the whole batch
        sorted_e, order = torch.sort(topk_NK.flatten(), stable=True)
        counts_E = torch.zeros(E, dtype=torch.long, device=dev).scatter_add_(
            0, sorted_e, torch.ones_like(sorted_e)
        )
        pos = (
            torch.arange(sorted_e.numel(), device=dev)
            - (torch.cumsum(counts_E, 0) - counts_E)[sorted_e]
        )
        fits = pos < dispatcher.capacity(N)
        keep_M = torch.empty_like(fits).scatter_(0, order, fits)
        dropped = (~fits).sum()
    parts, counts = [], []
    for a, b in token_bounds(N, num_chunks):
        sorted_e, order = torch.sort(topk_NK[a:b].flatten(), stable=True)
        if keep_M is not None:
            fits = keep_M[a * K : b * K].index_select(0, order)
            sorted_e, order = sorted_e[fits], order[fits]
        parts.append((a, b, order))
        counts.append(
            torch.zeros(E, dtype=torch.long, device=dev).scatter_add_(
                0, sorted_e, torch.ones_like(sorted_e)
            )
        )
    send_CWL = torch.stack(counts).view(num_chunks, W, L)
    recv_WCL = dispatcher.exchange.exchange_counts(
        send_CWL.transpose(0, 1).reshape(W, num_chunks * L)
    ).view(W, num_chunks, L)
    # One host sync: every chunk's splits, both directions.
    sizes = torch.cat([send_CWL.sum(2).flatten(), recv_WCL.sum(2).t().flatten()]).tolist()
    chunks = []
    for c, (a, b, order) in enumerate(parts):
        send, recv = sizes[c * W : (c + 1) * W], sizes[(num_chunks + c) * W :][:W]
        recv_WL = recv_WCL[:, c]
        regroup = regroup_index(recv_WL, sum(recv)) if W > 1 else None
        unregroup = inverse_permutation(regroup) if regroup is not None else None
        pos = inverse_permutation(order).view(b - a, K) if keep_M is None else None
        chunks.append(
            Chunk(a, b, order, order // K, send, recv, recv_WL.sum(0), regroup, unregroup, pos)
        )
    return chunks, dropped


class _Capture(torch.autograd.Function):
    """Enter a chunk graph: `data` requires grad through `anchor`; its grad lands in `box`."""

    @staticmethod
    def forward(ctx, anchor, data, box):
        ctx.box = box
        return data.view_as(data)

    @staticmethod
    def backward(ctx, g):
        ctx.box.append(g)
        return None, None, None


class _Root(torch.autograd.Function):
    """Leave a chunk graph: a zero-memory stand-in for `y` to call backward on later."""

    @staticmethod
    def forward(ctx, y):
        return y.new_zeros(()).expand(y.shape)

    @staticmethod
    def backward(ctx, g):
        return g


class _Pipelined(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, gates_NK, anchor, run):
        ctx.run = run
        return run.forward(x_ND, gates_NK, anchor)

    @staticmethod
    def backward(ctx, g_out, g_side):
        run, ctx.run = ctx.run, None
        if run is None:
            raise RuntimeError(
                "the MoE pipeline keeps no graph for a second backward "
                "(retain_graph is not supported with overlap.chunks/split_dw)"
            )
        with run.tl.span("backward"):
            dx, dgates = run.backward(g_out, g_side)
        return dx, dgates, None, None


class _Run:
    """One call of the pipeline: the schedule, and what the backward needs from the forward."""

    def __init__(
        self,
        chunks: list[Chunk],
        ex: Any,
        experts: Callable,
        shared: Callable | None,
        tl: LayerTimeline,
        drain: Callable[[Any], int] | None,
        grad: bool,
    ):
        self.chunks, self.ex, self.experts, self.shared = chunks, ex, experts, shared
        self.tl, self.drain, self.grad = tl, drain, grad
        self.side_box: list[Tensor] = []
        self.side_root: Tensor | None = None

    def forward(self, x_ND: Tensor, gates_NK: Tensor, anchor: Tensor | None):
        tl, ex, C = self.tl, self.ex, len(self.chunks)
        self.N, self.K, self.x_dtype, self.g_dtype = *gates_NK.shape, x_ND.dtype, gates_NK.dtype
        self.roots, self.boxes = [None] * C, [[] for _ in range(C)]
        self.y_home, self.w_M = [None] * C, [None] * C
        disp, comb, outs = [None] * C, [None] * C, [None] * C

        def issue_dispatch(c: int):
            ch = self.chunks[c]
            x_MD = x_ND[ch.a : ch.b].index_select(0, ch.token_M)
            return tl.issue("dispatch_a2a", lambda: ex.dispatch(x_MD, ch.send, ch.recv), x_MD)

        def run_experts(c: int, x_RD: Tensor) -> Tensor:
            ch = self.chunks[c]
            with tl.span("experts"), torch.enable_grad() if self.grad else nullcontext():
                if self.grad:
                    x_RD = _Capture.apply(anchor, x_RD, self.boxes[c])
                if ch.regroup_R is not None:
                    x_RD = permute_rows(x_RD, ch.regroup_R, ch.unregroup_R)
                y_RD = self.experts(x_RD, ch.counts_L)
                if ch.unregroup_R is not None:
                    y_RD = permute_rows(y_RD, ch.unregroup_R, ch.regroup_R)
                if self.grad:
                    self.roots[c] = _Root.apply(y_RD)
            return y_RD.detach()

        def finish(c: int, y_MD: Tensor) -> Tensor:
            ch = self.chunks[c]
            w_M = gates_NK[ch.a : ch.b].flatten().index_select(0, ch.order_M).to(y_MD.dtype)
            if self.grad:
                self.y_home[c], self.w_M[c] = y_MD, w_M
            if ch.pos_NK is not None:  # the plain path's `combine_tokens` arithmetic
                return weighted_sum(y_MD, gates_NK[ch.a : ch.b], ch.pos_NK)[0]
            out = y_MD.new_zeros(ch.b - ch.a, y_MD.shape[1])
            return out.index_add(0, ch.token_M, y_MD * w_M[:, None])

        disp[0] = issue_dispatch(0)
        side = x_ND.new_zeros(0)
        if self.shared is not None:
            side = self._side_forward(x_ND, anchor)  # overlaps D0
        for c in range(C):
            if c + 1 < C:
                disp[c + 1] = issue_dispatch(c + 1)
            y_RD = run_experts(c, tl.wait(disp[c]))
            ch = self.chunks[c]
            comb[c] = tl.issue(
                "combine_a2a", lambda y=y_RD, ch=ch: ex.combine(y, ch.recv, ch.send), y_RD
            )
            if c >= 1:
                outs[c - 1] = finish(c - 1, tl.wait(comb[c - 1]))
        outs[C - 1] = finish(C - 1, tl.wait(comb[C - 1]))
        return (outs[0] if C == 1 else torch.cat(outs)), side

    def _side_forward(self, x_ND: Tensor, anchor: Tensor | None) -> Tensor:
        with self.tl.span("shared"), torch.enable_grad() if self.grad else nullcontext():
            x = _Capture.apply(anchor, x_ND.detach(), self.side_box) if self.grad else x_ND
            s = self.shared(x)
            if self.grad:
                self.side_root = _Root.apply(s)
        return s.detach()

    def backward(self, g_out: Tensor, g_side: Tensor) -> tuple[Tensor, Tensor]:
        tl, ex, C, drain = self.tl, self.ex, len(self.chunks), self.drain
        g_out = g_out.contiguous()
        bg, dg, dxs, dgates = [None] * C, [None] * C, [None] * C, [None] * C

        def issue_bg(c: int):
            ch = self.chunks[c]
            y, w = self.y_home[c], self.w_M[c]
            self.y_home[c] = self.w_M[c] = None
            g_MD = g_out[ch.a : ch.b].index_select(0, ch.token_M)
            g_w = (g_MD * y).sum(1).to(self.g_dtype)
            if ch.pos_NK is not None:
                dgates[c] = g_w.index_select(0, ch.pos_NK.flatten())
            else:
                dgates[c] = g_w.new_zeros((ch.b - ch.a) * self.K).index_add_(0, ch.order_M, g_w)
            g_y = g_MD * w[:, None]
            return tl.issue("combine_a2a_bwd", lambda: ex.move(g_y, ch.send, ch.recv), g_y)

        def issue_dg(c: int, g_RD: Tensor):
            ch = self.chunks[c]
            with tl.span("experts_bwd"):
                torch.autograd.backward(self.roots[c], g_RD)
            self.roots[c] = None
            g_x = self.boxes[c].pop().contiguous()  # the buffer the exchange reads
            return tl.issue("dispatch_a2a_bwd", lambda: ex.move(g_x, ch.recv, ch.send), g_x)

        def finish(c: int, g_MD: Tensor) -> None:
            ch = self.chunks[c]
            if ch.pos_NK is not None:
                dxs[c] = sum_copies(g_MD, ch.pos_NK).to(self.x_dtype)
                return
            dx = g_MD.new_zeros(ch.b - ch.a, g_MD.shape[1], dtype=self.x_dtype)
            dxs[c] = dx.index_add_(0, ch.token_M, g_MD.to(self.x_dtype))

        bg[0] = issue_bg(0)
        dx_side = None
        if self.shared is not None:
            with tl.span("shared_bwd"):  # overlaps Bg0
                torch.autograd.backward(self.side_root, g_side)
            (dx_side,) = self.side_box
            self.side_root = None
        for c in range(C):
            if c + 1 < C:
                bg[c + 1] = issue_bg(c + 1)
            dg[c] = issue_dg(c, tl.wait(bg[c], drain))
            if c >= 1:
                finish(c - 1, tl.wait(dg[c - 1], drain))
        finish(C - 1, tl.wait(dg[C - 1], drain))
        dx = dxs[0] if C == 1 else torch.cat(dxs)
        if dx_side is not None:
            dx = dx + dx_side
        return dx, torch.cat(dgates).view(self.N, self.K)


class LayerOverlap:
    """The overlap engine of one MoE layer (installed as `moe.overlap` by braid.overlap.session).

    chunks: C >= 1; split_dw: defer weight grads into `queue` (the routed experts' only if
    `defer_expert_dw`, the shared experts' always). With chunks == 1 and split_dw off
    (installed only for `overlap.report`), the schedule is the plain path's: every exchange is
    waited right after issue and the shared experts run after the combine.
    """

    def __init__(
        self, layer: int, chunks: int, split_dw: bool, clock: Clock, defer_expert_dw: bool = True
    ):
        self.layer, self.chunks, self.split_dw = layer, chunks, split_dw
        self.defer_expert_dw = split_dw and defer_expert_dw  # see session.expert_dw_deferrable
        self.timeline = LayerTimeline(layer, clock)
        self.queue = WgradQueue(self.timeline.span)
        self.predicted_ms: float | None = None

    def flush_point(self, x_ND: Tensor) -> Tensor:
        """Identity whose backward flushes this layer's dW queue (call at the layer input)."""
        return flush_point(x_ND, self.queue) if self.split_dw else x_ND

    def run(
        self,
        x_ND: Tensor,
        topk_NK: Tensor,
        gates_NK: Tensor,
        dispatcher: Any,
        experts: Any,
        shared: Any | None,
        shared_gate: Any | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Steps 2-5 of MoE.forward; returns (out_ND with the shared experts added, dropped).
        `shared_gate` (or None) scales the shared experts' output (`braid.ops.swiglu.gated`)."""
        sink = self.queue if self.split_dw else None
        overlap_shared = shared is not None and (self.chunks > 1 or self.split_dw)
        side = None
        if overlap_shared:
            if sink is not None:
                side = lambda x: gated(swiglu_split_dw(shared, x, sink), x, shared_gate)  # noqa: E731
            else:
                side = lambda x: gated(shared(x), x, shared_gate)  # noqa: E731
        grad = torch.is_grad_enabled()
        with self.timeline.span("forward"):
            chunks, dropped = plan_chunks(topk_NK, self.chunks, dispatcher)
            expert_sink = sink if self.defer_expert_dw else None
            run = _Run(
                chunks,
                dispatcher.exchange,
                lambda x, n: experts(x, n, expert_sink),
                side,
                self.timeline,
                self.queue.drain if sink is not None else None,
                grad,
            )
            if grad:
                anchor = torch.zeros((), device=x_ND.device, requires_grad=True)
                out_ND, side_ND = _Pipelined.apply(x_ND, gates_NK, anchor, run)
            else:
                out_ND, side_ND = run.forward(x_ND, gates_NK, None)
        if self.timeline.timing:
            self.timeline.num_forward += 1
        if overlap_shared:
            out_ND = out_ND + side_ND
        elif shared is not None:
            out_ND = out_ND + gated(shared(x_ND), x_ND, shared_gate)
        return out_ND, dropped
