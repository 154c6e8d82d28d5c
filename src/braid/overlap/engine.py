"""The overlap engine of one MoE layer: what `moe.overlap` is (installed by
`braid.overlap.session`).

Job: hold one layer's deferred-dW queues (`braid.overlap.wgrad`), its FSDP expert unit and the
block units it holds (`braid.overlap.fsdp_unit`), its timeline, and its chunking; and run steps
2b-5 of `MoE.forward` as a `braid.overlap.pipeline.Schedule` over the dispatcher's plan. The
schedule itself (phases, autograd) is documented in `braid.overlap.pipeline`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from braid.ops.swiglu import gated
from braid.overlap.config import chunk_axis
from braid.overlap.fsdp_unit import HeldUnit
from braid.overlap.joined_experts import JoinedExpertWgrad
from braid.overlap.pipeline import Schedule
from braid.overlap.shared_halves import joined_side
from braid.overlap.streams import Clock
from braid.overlap.timeline import LayerTimeline
from braid.overlap.wgrad import JoinedWgrad, Task, WgradQueue, flush_point


class LayerOverlap:
    """The overlap engine of one MoE layer (installed as `moe.overlap` by braid.overlap.session).

    chunks: C >= 1; split_dw: defer weight grads into `queue` (the routed experts' only if
    `defer_expert_dw`, the shared experts' always). With chunks of tokens, `chunk_dw` says
    whether the routed experts' dW runs per chunk or once over every chunk's rows
    (`braid.overlap.joined_experts`; deferred, or, without split_dw, at the last chunk's
    backward: "joined", or "auto" where the kernel reads the chunks in place). With chunks == 1
    and split_dw off (installed only for `overlap.report`), the schedule is the plain path's:
    every exchange is waited right after issue and the shared experts run after the combine.
    With split_dw = "all" (`braid.overlap.dense`), `dense` holds the attention / dense-FFN dW
    of the blocks above this layer (pushed through `dense_sink`): drained in this layer's
    windows after `queue`, flushed at its flush point, where those blocks' FSDP units are
    reduced.
    """

    def __init__(
        self,
        layer: int,
        chunks: int,
        split_dw: bool,
        clock: Clock,
        defer_expert_dw: bool = True,
        chunk_by: str = "auto",
        chunk_dw: str = "auto",
    ):
        self.layer, self.chunks, self.split_dw = layer, chunks, split_dw
        self.chunk_by = chunk_by  # `OverlapConfig.chunk_by`
        self.chunk_dw = chunk_dw  # `OverlapConfig.chunk_dw`
        # Routed-expert dW too (an FSDP expert unit waits for it: `fsdp_unit.HeldUnit`).
        self.defer_expert_dw = split_dw and defer_expert_dw
        self.timeline = LayerTimeline(layer, clock)
        self.queue = WgradQueue(self.timeline.span)
        self.dense = WgradQueue(self.timeline.span, "dense_dW")  # split_dw = "all"
        self._held: list[HeldUnit] = []  # block units held until `dense` is flushed
        self.predicted_ms: float | None = None
        self.unit: HeldUnit | None = None  # the experts, once `run` has seen them
        self.joined: JoinedExpertWgrad | None = None  # the last call's, with chunks of tokens

    def chunking(self, num_local: int) -> tuple[int, str]:
        """(C, what a chunk holds: "experts" or "tokens") for a layer of `num_local` experts per
        rank (`braid.moe.dispatcher.TokenDispatcher.plan`)."""
        return self.chunks, chunk_axis(self.chunk_by, self.chunks, num_local)

    @torch.compiler.disable  # traced, its backward's flush would run once, at trace time
    def flush_point(self, x_ND: Tensor) -> Tensor:
        """Identity whose backward flushes this layer's dW queue, then reduces its FSDP expert
        unit once (call at the layer input)."""
        return flush_point(x_ND, self)

    def flush(self) -> int:
        """Run every queued dW of the layer, then the expert unit's one reduction if held; then
        the deferred dW of the blocks above, then their held units' reductions."""
        n = self.queue.flush()
        if self.unit is not None:
            self.unit.reduce()
        n += self.dense.flush()
        while self._held:
            self._held.pop().reduce()
        return n

    def drain(self, handle: Any) -> int:
        """Run queued dW while `handle` is in flight: the layer's own first, then `dense`."""
        n = self.queue.drain(handle)
        return n + self.dense.drain(handle)

    def routed_dw(self) -> str | None:
        """What the last call's chunks of tokens did with the routed dW: "joined", "per_chunk"
        or "mixed" (`JoinedExpertWgrad.decided`); None without chunks of tokens, with
        chunk_dw="per_chunk" and no split_dw, or before a backward reached the chunks."""
        return None if self.joined is None else self.joined.decided()

    def dense_sink(self, unit: HeldUnit) -> Callable[[Task], None]:
        """The sink of one block's deferred dW (`braid.overlap.dense`): this layer's `dense`
        queue. The block's FSDP unit (`unit`; a no-op without one) is held from the first dW
        until this layer's flush point, so its reduce-scatter sees every deferred dW."""

        def sink(task: Task) -> None:
            if unit.module is not None and not unit.held:
                unit.hold()
                self._held.append(unit)
            self.dense(task)

        return sink

    @torch.compiler.disable  # eager by nature: one graph break (docs/overlap.md, compile)
    def run(
        self,
        x_ND: Tensor,
        gates_NK: Tensor,
        plan: Any,
        dispatcher: Any,
        experts: Any,
        shared: Any | None,
        shared_gate: Any | None = None,
    ) -> Tensor:
        """Steps 2b-5 of MoE.forward over `plan.routes` (`braid.moe.dispatcher.Plan`); returns
        out_ND with the shared experts added, scaled by `shared_gate` when there is one
        (`braid.ops.swiglu.gated`)."""
        sink = self.queue if self.split_dw else None
        overlap_shared = shared is not None and (self.chunks > 1 or self.split_dw)
        side, halves = None, 1
        if overlap_shared and sink is not None:  # token halves, their dW joined (`Schedule`)
            side, halves = joined_side(shared, shared_gate, JoinedWgrad(sink, 2)), 2
        elif overlap_shared:
            side = lambda x, h: gated(shared(x), x, shared_gate)  # noqa: E731
        grad = torch.is_grad_enabled()
        if self.unit is None or self.unit.module is not experts:
            self.unit = HeldUnit(experts)
        casts = getattr(experts, "shared_casts", nullcontext)()  # one weight cast per layer
        with self.timeline.span("forward"), casts:
            expert_sink = sink if self.defer_expert_dw else None
            sinks, joined = [expert_sink] * len(plan.routes), None
            tokens = grad and plan.whole is None and len(plan.routes) > 1  # chunks of tokens
            # the fp8 experts hand over finished dW tasks, not operands: per chunk, and back
            # to autograd when not deferred
            fp8 = getattr(experts, "fp8_stats", None) is not None
            chunk_dw = "per_chunk" if fp8 else self.chunk_dw
            if tokens and (expert_sink is not None or chunk_dw != "per_chunk"):
                rows = [sum(r.recv) for r in plan.routes]
                # Deferred: the joined dW is queued. Not deferred, it runs at once when the
                # last chunk's backward hands its operands over, where autograd would have
                # added that chunk's dW, and goes into the grads directly, past autograd's
                # hooks; "auto" joins there only where the kernel reads the chunks in place
                # (every chunk's operands are held until then, as the plain path holds its
                # rows; a gather would add a copy), else each chunk's dW goes back to autograd.
                now = expert_sink if expert_sink is not None else (lambda task: task())
                joined = JoinedExpertWgrad(now, rows, chunk_dw, expert_sink is not None)
                sinks = [joined.block(c) for c in range(len(rows))]
            self.joined = joined
            run = Schedule(
                plan.routes,
                plan.whole,
                dispatcher,
                lambda c, x, n, part: experts(x, n, sinks[c], part),
                side,
                halves,
                self.timeline,
                self.drain if sink is not None else None,
                grad,
                self.unit,
                joined,
            )
            out_ND, side_ND = run.apply(x_ND, gates_NK)
        if self.timeline.timing:
            self.timeline.num_forward += 1
        if overlap_shared:
            out_ND = out_ND + side_ND
        elif shared is not None:
            out_ND = out_ND + gated(shared(x_ND), x_ND, shared_gate)
        return out_ND
