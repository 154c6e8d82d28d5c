"""The weight-gradient queue: dX now, dW later, while an exchange is in flight (FluidMoE).

Job: hold the weight-gradient GEMMs that `grouped_linear(..., wgrad_sink=queue)` and
`split_linear` hand over in backward, run them while an exchange is in flight, and guarantee
that nothing is left queued when gradients are read.

Phases of one MoE layer's backward with `overlap.split_dw = "experts"` (or "all", where each
MoE layer has a second queue for the attention and dense-FFN dW of the blocks above it,
`braid.overlap.dense`, drained after this one):
  1. a GEMM's backward computes dX at once (the exchange that needs it can start) and pushes its
     dW closure here (`WgradQueue.__call__`, the `WgradSink` signature);
  2. the pipeline issues the exchange and calls `drain(handle)`: queued dW runs on the compute
     stream while `not handle.done()` (on CUDA the host runs ahead of the GPU, so this
     enqueues every queued dW behind the issue; the GPU runs them beside the exchange);
  3. `wait()` on the handle; whatever did not fit stays queued for the next window;
  4. flush points: `flush_point(x, queue)` is an autograd identity at the MoE layer's input whose
     backward runs `flush()` — the gradient reaches the layer input only after every GEMM of the
     layer is done, and before it reaches the block input, where FSDP2 reduce-scatters the
     block's grads. The trainer flushes every queue again before clipping and the optimizer step.

Contract: `flush()` leaves the queue empty; tasks run in the order they were queued (so a
parameter's grad accumulates in the same order as without the split); a task adds into
`param.grad`, so grad accumulation over micro-batches works unchanged.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from braid.ops.grouped_gemm import accumulate_grad, compute_dtype
from braid.ops.swiglu import swiglu
from braid.overlap.streams import in_flight

Task = Callable[[], None]


class WgradQueue:
    """FIFO of deferred weight-gradient GEMMs for one MoE layer (callable: a `WgradSink`).
    Tasks run in `span(name)` when drained in a window, `span(name + "_flush")` when flushed."""

    def __init__(
        self, span: Callable[[str], AbstractContextManager] | None = None, name: str = "dW"
    ):
        self._tasks: deque[Task] = deque()
        self._span = span or (lambda kind: nullcontext())
        self.name = name
        self.num_run = 0  # tasks run since construction (tests and the timeline read it)
        self.num_drained = 0  # of those, tasks run inside an exchange window (by `drain`)

    def __call__(self, task: Task) -> None:
        self._tasks.append(task)

    def __len__(self) -> int:
        return len(self._tasks)

    def drain(self, handle: Any) -> int:
        """Run queued tasks while `handle`'s exchange is in flight; returns how many ran."""
        n = 0
        while self._tasks and in_flight(handle):
            self._run_one()
            n += 1
        self.num_drained += n
        return n

    def flush(self) -> int:
        """Run every queued task (a flush point); returns how many ran."""
        n = len(self._tasks)
        while self._tasks:
            self._run_one("_flush")
        return n

    def _run_one(self, suffix: str = "") -> None:
        with self._span(self.name + suffix):
            self._tasks.popleft()()
        self.num_run += 1


class _FlushPoint(torch.autograd.Function):
    """Identity; its backward flushes the queue before passing the gradient on."""

    @staticmethod
    def forward(ctx, x, queue):
        ctx.queue = queue
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.queue.flush()
        return g, None


def flush_point(x: Tensor, queue: WgradQueue) -> Tensor:
    """`x`, with a backward that flushes `queue` once the gradient reaches this point."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x
    return _FlushPoint.apply(x, queue)


class JoinedWgrad:
    """The dW of linears run in `blocks` row blocks (the shared experts' two token halves): each
    block's backward leaves its operands here (`block(b)`, a sink for `split_linear`), and once
    every block's are in, one dW GEMM over all their rows, in block order, goes to `sink`. That
    is the unsplit layer's GEMM over the same rows: no partial dW is added into a grad (which
    in a bf16 gradient would round twice). With one block (`split_linear` given a plain task
    sink) each backward's dW GEMM is queued at once."""

    def __init__(self, sink: Callable[[Task], None], blocks: int):
        self.sink, self.blocks = sink, blocks
        self._parts: dict[int, dict[int, tuple[Tensor, Tensor, Tensor]]] = {}  # id(w) -> b -> ...

    def block(self, b: int) -> _Block:
        return _Block(self, b)

    def add(self, b: int, w: Tensor, x: Tensor, g: Tensor) -> None:
        parts = self._parts.setdefault(id(w), {})
        parts[b] = (w, x, g)
        if len(parts) < self.blocks:
            return
        del self._parts[id(w)]
        x, g = (_rows([parts[i][k] for i in range(self.blocks)]) for k in (1, 2))

        def wgrad(w=w, x=x, g=g):
            accumulate_grad(w, g.t() @ x)

        self.sink(wgrad)


def _rows(blocks: list[Tensor]) -> Tensor:
    """The blocks' rows as one [rows, features] operand (one block: no copy)."""
    rows = [t.flatten(0, -2) for t in blocks]
    return rows[0] if len(rows) == 1 else torch.cat(rows)


class _Block:
    """Block `b` of a `JoinedWgrad`: what `split_linear` hands its dW operands to."""

    def __init__(self, joined: JoinedWgrad, b: int):
        self.joined, self.b = joined, b

    def add(self, w: Tensor, x: Tensor, g: Tensor) -> None:
        self.joined.add(self.b, w, x, g)


class _SplitLinear(torch.autograd.Function):
    """y = x @ w^T with dX in backward and dW handed to the sink (same casts as autocast)."""

    @staticmethod
    def forward(ctx, x, w, sink):
        dt = compute_dtype(x)
        x_c, w_c = x.to(dt), w.to(dt)
        ctx.save_for_backward(x_c, w_c)
        ctx.w, ctx.x_dtype, ctx.sink = w, x.dtype, sink
        return F.linear(x_c, w_c)

    @staticmethod
    def backward(ctx, g):
        x_c, w_c = ctx.saved_tensors
        g = g.to(x_c.dtype)
        dx = (g @ w_c).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        if ctx.needs_input_grad[1]:
            ctx.sink.add(ctx.w, x_c, g)
        return dx, None, None


def split_linear(x: Tensor, weight: Tensor, sink: Callable[[Task], None] | _Block) -> Tensor:
    """`F.linear(x, weight)` whose weight gradient is handed to `sink` in backward (or, for a
    `JoinedWgrad` block, its operands, to be joined with the other blocks')."""
    if not isinstance(sink, _Block):  # a task sink: a block of one, its dW queued at once
        sink = JoinedWgrad(sink, 1).block(0)
    return _SplitLinear.apply(x, weight, sink)


def swiglu_split_dw(ffn: nn.Module, x: Tensor, sink: Callable[[Task], None] | _Block) -> Tensor:
    """A `braid.model.layers.SwiGLU` (w13 fused, w2; no bias) with its dW handed to `sink`."""
    return split_linear(swiglu(split_linear(x, ffn.w13.weight, sink)), ffn.w2.weight, sink)
