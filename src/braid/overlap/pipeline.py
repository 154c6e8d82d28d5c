"""Chunked MoE pipeline: steps 2-5 of `MoE.forward` as C token chunks whose exchanges overlap.

Job: the same result as dispatch -> experts -> combine (+ shared) of `braid.moe`, with the
exchange of one chunk in flight while another chunk's experts run, in forward and backward.

Design: the dispatcher's plan cuts the layer into C routes
(`braid.moe.dispatcher.TokenDispatcher.plan`: one count exchange and one host sync for all of
them; capacity decided over the whole batch): contiguous ranges of local experts (chunks of
experts: each expert's GEMMs and dW run once, on all its rows; the weighted sum of a token's
copies, which span the chunks, runs once over the plan's `whole` route), or of tokens (Tutel /
PlanMoE: each route an independent dispatch -> experts -> combine over its tokens). Per copy
the arithmetic is the plain path's; only the grouping of rows into GEMM calls differs.
This file holds no routing math: it is a scheduler over the dispatcher's per-route
primitives (send_rows, issue_dispatch, to_experts/from_experts, issue_combine, finish;
combine_grad, issue_back, finish_grad), which return `braid.exchange` handles, and it waits
on handles through their contract only (`wait`, `done`, `elapsed_ms`).

Autograd: one Function spans the region. Its forward runs the schedule below and keeps, per
chunk, a small expert-side graph (received rows -> regroup -> experts -> un-regroup) built under
enable_grad; token-side steps go through the dispatcher's autograd-free primitives and their
hand-written backward (`combine_grad`, `finish_grad`), so nothing is kept that the plain path
frees. Its backward replays the schedule in reverse, calling torch.autograd.backward on each
chunk's graph.

Phases (forward; D = dispatch exchange, E = experts, B = combine exchange, S = shared experts,
S0 / S1 = the shared experts of the first / second half of the tokens):
  issue D0; S0 (overlaps D0);
  for c: issue D[c+1]; wait D[c]; E[c]; issue B[c]; wait B[c-1], finish c-1
  S1 (overlaps B[C-1]); wait B[C-1], finish C-1.
Backward mirrors it (Bg/Dg: the gradient exchanges, straight-through `move`):
  issue Bg0; S backward, both halves (overlaps Bg0; their joined dW queued when split_dw);
  for c: issue Bg[c+1]; wait Bg[c]; E[c] backward (dX; dW queued when split_dw); issue Dg[c];
         wait Dg[c-1], finish c-1
  wait Dg[C-1], finish C-1.
Every wait first drains the layer's dW queue while the exchange is in flight. With chunks of
tokens and split_dw, the routed experts' dW may be one GEMM per weight over every chunk's rows,
queued at the last chunk's E backward (`overlap.chunk_dw`, `braid.overlap.joined_experts`).
The fill (D0) and the drain (B[C-1]) are the exchanges no chunk's experts overlap; with
split_dw the shared experts, split by tokens, cover both, and their dW is still one GEMM per
weight over all tokens (`JoinedWgrad`); without split_dw S runs whole beside D0 (S0 = S, no
S1). The backward needs no split: its windows have dW to fill, and the shared experts' dW is
queued at Bg0 only once both halves' backward ran.

Shape legend: N tokens, K experts per token, D dim, E experts, W EP ranks, L = E/W, M copies,
R rows received, C chunks. The dispatcher and experts are duck-typed (no `braid.moe` import).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from braid.overlap.fsdp_unit import HeldUnit
from braid.overlap.graph_ends import Capture, Root
from braid.overlap.joined_experts import JoinedExpertWgrad
from braid.overlap.shared_halves import half_tokens
from braid.overlap.timeline import LayerTimeline


class _Home:
    """With chunks of experts (`whole` set), the one buffer of `whole`'s rows that every chunk's
    movement home is received into (allocated at the first chunk, like its rows); else None."""

    def __init__(self, whole: Any | None):
        self.whole, self.buf = whole, None

    def slot(self, route: Any, like: Tensor) -> Tensor | None:
        """The rows of `route` in the buffer (None without chunks of experts)."""
        if self.whole is None:
            return None
        if self.buf is None:
            self.buf = like.new_empty((self.whole.send[0], like.shape[1]))
        return self.buf[route.rows[0] : route.rows[1]]


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


class Schedule:
    """One call of the pipeline: the schedule, and what the backward needs from the forward
    (`LayerOverlap.run` builds one per call, then `apply`)."""

    def __init__(
        self,
        routes: list[Any],
        whole: Any | None,
        dispatcher: Any,
        experts: Callable,
        shared: Callable | None,
        shared_halves: int,
        tl: LayerTimeline,
        drain: Callable[[Any], int] | None,
        grad: bool,
        unit: HeldUnit,
        joined: JoinedExpertWgrad | None = None,
    ):
        self.routes, self.dsp, self.experts, self.shared = routes, dispatcher, experts, shared
        self.whole = whole  # chunks of experts: the route of all copies, finished once
        self.unit = unit
        self.joined = joined  # chunks of tokens: one routed-expert dW over all their rows
        self.tl, self.drain, self.grad = tl, drain, grad
        C = len(routes)
        self.roots: list[Tensor | None] = [None] * C  # per chunk: the expert graph's end
        self.boxes: list[list[Tensor]] = [[] for _ in range(C)]  # ... and its input grad
        self.y_home: list[Tensor | None] = [None] * C  # expert outputs back home (combine_grad)
        self.y_whole: Tensor | None = None  # ... all of them, with chunks of experts
        # The shared experts' two token halves (S0, S1): input grads and graph ends.
        self.side_boxes: list[list[Tensor]] = [[], []]
        self.side_roots: list[Tensor | None] = [None, None]
        self.side_halves, self.side_split = shared_halves, 0  # S0 = tokens [0, side_split)
        self.gates_NK: Tensor | None = None
        self.x_dtype = torch.float32

    def forward(self, x_ND: Tensor, gates_NK: Tensor, anchor: Tensor | None):
        tl, dsp, C = self.tl, self.dsp, len(self.routes)
        self.x_dtype = x_ND.dtype
        if self.grad:
            self.gates_NK = gates_NK
        disp, comb, outs = [None] * C, [None] * C, [None] * C

        def issue_dispatch(c: int):
            route = self.routes[c]
            x_MD = dsp.send_rows(x_ND, route, self.grad)
            return tl.issue("dispatch_a2a", lambda: dsp.issue_dispatch(x_MD, route), x_MD)

        def run_experts(c: int, x_RD: Tensor) -> Tensor:
            route = self.routes[c]
            with tl.span("experts"), torch.enable_grad() if self.grad else nullcontext():
                if self.grad:
                    x_RD = Capture.apply(anchor, x_RD, self.boxes[c])
                # Chunks of experts cover every expert once: their dW rows are written, not
                # added to zeros (`grouped_gemm.accumulate_grad`). Not in an FSDP unit: its
                # post-backward runs after each chunk's call and, with a reduce dtype, moves
                # the grad written so far into its accumulator, unwritten rows and all.
                covers = self.unit.module is None
                part = None if route.part is None else (*route.part, covers)
                y_RD = self.experts(c, dsp.to_experts(x_RD, route), route.counts_L, part)
                y_RD = dsp.from_experts(y_RD, route)
                if self.grad:
                    self.roots[c] = Root.apply(y_RD)
            return y_RD.detach()

        def finish(c: int, y_MD: Tensor) -> Tensor:
            if self.whole is not None:  # a token's copies span the chunks: summed at the end
                return y_MD
            if self.grad:
                self.y_home[c] = y_MD
            return dsp.finish(y_MD, gates_NK, self.routes[c], self.grad)

        home = _Home(self.whole)  # chunks of experts: every chunk's rows come home into one

        def issue_combine(c: int, y_RD: Tensor):
            route = self.routes[c]
            out = home.slot(route, y_RD)
            go = lambda: dsp.issue_combine(y_RD, route, out)  # noqa: E731
            return tl.issue("combine_a2a", go, y_RD)

        disp[0] = issue_dispatch(0)
        sides = [x_ND.new_zeros(0)]
        if self.shared is not None:
            n = x_ND.shape[0]
            self.side_split = half_tokens(n) if self.side_halves == 2 else n
            sides = [self._side_forward(x_ND, anchor, 0)]  # overlaps D0
        self.unit.gather()  # an FSDP expert unit: one all-gather for every chunk
        for c in range(C):
            if c + 1 < C:
                disp[c + 1] = issue_dispatch(c + 1)
            comb[c] = issue_combine(c, run_experts(c, tl.wait(disp[c])))
            if c >= 1:
                outs[c - 1] = finish(c - 1, tl.wait(comb[c - 1]))
            if c == C - 1:
                self.unit.release()
        if self.side_halves == 2:
            sides.append(self._side_forward(x_ND, anchor, 1))  # overlaps B[C-1]
        side = sides[0] if len(sides) == 1 else torch.cat(sides)
        outs[C - 1] = finish(C - 1, tl.wait(comb[C - 1]))
        if self.whole is not None:
            y_MD = home.buf  # the copies in `whole`'s order, received in place
            if self.grad:
                self.y_whole = y_MD
            return dsp.finish(y_MD, gates_NK, self.whole, self.grad), side
        return (outs[0] if C == 1 else torch.cat(outs)), side

    def _side_rows(self, half: int, n: int) -> slice:
        return slice(0, self.side_split) if half == 0 else slice(self.side_split, n)

    def _side_forward(self, x_ND: Tensor, anchor: Tensor | None, half: int) -> Tensor:
        """The shared experts of token half `half` (0: the first `side_split` tokens)."""
        x_ND = x_ND[self._side_rows(half, x_ND.shape[0])]
        with self.tl.span("shared"), torch.enable_grad() if self.grad else nullcontext():
            box = self.side_boxes[half]
            x = Capture.apply(anchor, x_ND.detach(), box) if self.grad else x_ND
            s = self.shared(x, half)
            if self.grad:
                self.side_roots[half] = Root.apply(s)
        return s.detach()

    def _side_backward(self, g_side: Tensor, half: int) -> Tensor:
        """Backward of `_side_forward(.., half)`: the grad of that half's shared-expert input."""
        with self.tl.span("shared_bwd"):
            g = g_side[self._side_rows(half, g_side.shape[0])]
            torch.autograd.backward(self.side_roots[half], g)
        self.side_roots[half] = None
        return self.side_boxes[half].pop()

    def backward(self, g_out: Tensor, g_side: Tensor) -> tuple[Tensor, Tensor]:
        tl, dsp, C, drain = self.tl, self.dsp, len(self.routes), self.drain
        g_out = g_out.contiguous()
        bg, dg, dxs, dgates = [None] * C, [None] * C, [None] * C, [None] * C
        whole, g_whole = self.whole, None
        if whole is not None:  # chunks of experts: every copy's grad at once, then sliced
            g_whole, dgates_whole = dsp.combine_grad(g_out, self.y_whole, self.gates_NK, whole)
            self.y_whole = None

        def issue_bg(c: int):
            route = self.routes[c]
            if g_whole is not None:
                g_MD = g_whole[route.rows[0] : route.rows[1]]
            else:
                y_MD, self.y_home[c] = self.y_home[c], None
                g_MD, dgates[c] = dsp.combine_grad(g_out, y_MD, self.gates_NK, route)
            return tl.issue("combine_a2a_bwd", lambda: dsp.issue_back(g_MD, route, "experts"), g_MD)

        g_home = _Home(whole)  # chunks of experts: every chunk's copy grads come home into one

        def issue_dg(c: int, g_RD: Tensor):
            with tl.span("experts_bwd"):
                torch.autograd.backward(self.roots[c], g_RD)
            self.roots[c] = None
            g_x = self.boxes[c].pop().contiguous()  # the buffer the exchange reads
            route = self.routes[c]
            out = g_home.slot(route, g_x)
            go = lambda: dsp.issue_back(g_x, route, "home", out)  # noqa: E731
            return tl.issue("dispatch_a2a_bwd", go, g_x)

        def finish(c: int, g_MD: Tensor) -> None:
            if whole is None:  # chunks of experts: summed per token at the end, over g_home
                dxs[c] = dsp.finish_grad(g_MD, self.routes[c], self.x_dtype)

        self.unit.hold()  # an FSDP expert unit: reduce-scattered once, at the flush point
        bg[0] = issue_bg(0)
        dx_side = None
        if self.shared is not None:  # overlaps Bg0; both halves, so that their dW is queued here
            halves = [self._side_backward(g_side, h) for h in range(self.side_halves)]
            dx_side = halves[0] if len(halves) == 1 else torch.cat(halves)
        for c in range(C):
            if c + 1 < C:
                bg[c + 1] = issue_bg(c + 1)
            dg[c] = issue_dg(c, tl.wait(bg[c], drain))
            if c >= 1:
                finish(c - 1, tl.wait(dg[c - 1], drain))
        finish(C - 1, tl.wait(dg[C - 1], drain))
        if self.joined is not None:
            self.joined.close()  # (every chunk's backward reached it: nothing left to queue)
        self.gates_NK = None
        if whole is not None:
            dx = dsp.finish_grad(g_home.buf, whole, self.x_dtype)
            dgates = [dgates_whole]
        else:
            dx = dxs[0] if C == 1 else torch.cat(dxs)
        if dx_side is not None:
            dx = dx + dx_side
        return dx, torch.cat(dgates)

    def apply(self, x_ND: Tensor, gates_NK: Tensor) -> tuple[Tensor, Tensor]:
        """(out_ND without the shared experts, the shared experts' out) of the schedule, under
        one autograd Function when grads are on."""
        if not self.grad:
            return self.forward(x_ND, gates_NK, None)
        anchor = torch.zeros((), device=x_ND.device, requires_grad=True)
        return _Pipelined.apply(x_ND, gates_NK, anchor, self)
