"""The exchange alone: record the movements of one step, then time exactly those by themselves.

Used by benchmarks/overlap_bench.py for its `exchange_alone_ms` (the MoE layer part and the
training-step part). `record(exchange)` wraps the exchange object's `dispatch`, `combine` and
`move` on the instance while a step runs and keeps one `Movement` per call (payload shape and
dtype, send and receive splits; a `dispatch` that calls `move` inside counts once). `time_alone`
replays them in the same order on fresh buffers, each waited before the next is issued (nothing
to overlap with), and returns the slowest rank's median ms of the whole sequence. For one MoE
layer that is its four all_to_alls (dispatch and combine, forward and backward) at the step's
own splits, as benchmarks/moe_layer.py measures `exchange_ms`; for a training step, the four of
every MoE layer.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import time_cuda  # noqa: E402

METHODS = ("dispatch", "combine", "move")


@dataclass(frozen=True)
class Movement:
    method: str  # dispatch, combine or move (the backward's straight-through movements)
    shape: tuple[int, ...]
    dtype: torch.dtype
    send: tuple[int, ...]
    recv: tuple[int, ...]


@contextmanager
def record(exchange: Any) -> Iterator[list[Movement]]:
    """Within the block, every movement through `exchange` is appended to the yielded list."""
    calls: list[Movement] = []
    depth = [0]
    saved = {m: exchange.__dict__.get(m) for m in METHODS}

    def wrap(method: str, inner):
        def wrapped(x, send, recv):
            if depth[0] == 0:
                calls.append(Movement(method, tuple(x.shape), x.dtype, tuple(send), tuple(recv)))
            depth[0] += 1
            try:
                return inner(x, send, recv)
            finally:
                depth[0] -= 1

        return wrapped

    for m in METHODS:
        setattr(exchange, m, wrap(m, getattr(exchange, m)))
    try:
        yield calls
    finally:
        for m, old in saved.items():
            if old is None:
                delattr(exchange, m)
            else:
                setattr(exchange, m, old)


def slowest(value: float, device: torch.device) -> float:
    """The largest `value` over all ranks (timings: the slowest rank sets the pace)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def time_alone(
    exchange: Any, calls: list[Movement], device: torch.device, iters: int
) -> dict[str, Any]:
    """The recorded movements replayed back to back, each waited at once: slowest-rank median."""

    def replay() -> None:
        for mv in calls:
            buf = torch.empty(mv.shape, dtype=mv.dtype, device=device)
            getattr(exchange, mv.method)(buf, list(mv.send), list(mv.recv)).wait()

    t = time_cuda(replay, iters=iters, warmup=2)
    rows = sum(sum(mv.send) for mv in calls)
    return {
        "exchange_alone_ms": slowest(t["median_ms"], device),
        "exchange_alone_movements": len(calls),
        "exchange_alone_rows_sent": rows,  # this rank's; rank 0's in the JSON
        "exchange_alone_bytes_sent": sum(
            sum(mv.send) * math.prod(mv.shape[1:]) * mv.dtype.itemsize for mv in calls
        ),
    }
