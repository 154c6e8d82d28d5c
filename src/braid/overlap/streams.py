"""Streams, events and buffer lifetimes for overlapped work: the one module that touches streams.

Braid runs two streams of work per rank and creates none of its own for training:
- the *compute stream* (torch's current stream): every GEMM, permutation and deferred dW;
- the *exchange stream*: NCCL's internal stream. `all_to_all_single(async_op=True)` makes it wait
  for the compute stream at issue; `Work.wait()` makes the compute stream wait for it (the host
  does not block on CUDA; on gloo/CPU the host blocks).
`new_stream` is the only place a CUDA stream is created (benchmarks use it to measure
interference); `Clock` stamps the compute stream (CUDA events, or the host clock on CPU).

Buffer lifetime contract (stream safety): a tensor handed to an async exchange must stay alive,
unmodified, until the handle has been waited. `InFlight` holds the send buffer and the handle
together and is the only way the pipeline waits, so the send buffer is released only after the
compute stream has been ordered behind the exchange; later reuse of that memory by the caching
allocator is then ordered after the exchange too (the equivalent of `record_stream`, without
its delayed frees). The receive buffer is allocated on the compute stream before issue, which
NCCL's stream waits for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def new_stream(device: torch.device, high_priority: bool = False) -> torch.cuda.Stream:
    """A fresh CUDA stream on `device` (the single creation point; see the module docstring).
    `high_priority` (`exchange.high_priority`): the device's greatest stream priority, so the
    block scheduler starts its kernels before queued ones of default-priority streams as SMs
    free up (a running kernel is not preempted)."""
    priority = torch.cuda.Stream.priority_range()[1] if high_priority else 0
    return torch.cuda.Stream(device=device, priority=priority)


def synchronize(device: torch.device) -> None:
    """Host waits for all work queued on `device` (no-op on CPU, where work is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Timestamps on the compute stream: CUDA events (read after `synchronize`) or host time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def ms(self, start: Any, end: Any) -> float:
        """Milliseconds between two marks (CUDA: both events must have completed)."""
        if self.cuda:
            return start.elapsed_time(end)
        return 1e3 * (end - start)


@dataclass
class InFlight:
    """One async exchange: its handle plus the send buffer it reads until waited."""

    handle: Any  # braid.exchange.base.Handle
    send: Tensor | None
    kind: str = "exchange"  # name in traces: dispatch_a2a, combine_a2a, ...
    record: Any = None  # the timeline's stamps for this exchange, when timing

    def wait(self) -> Tensor:
        out = self.handle.wait()
        self.send = None  # safe to free now: the compute stream is ordered after the exchange
        return out


def in_flight(handle: Any) -> bool:
    """True while an exchange has not completed (`Handle.done()`, the exchange contract)."""
    return not handle.done()
