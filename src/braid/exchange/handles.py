"""Ready-made `Handle`s (`braid.exchange.base`) for the two ways a movement can be in flight.

- `WorksHandle(works, out)`: torch.distributed `Work`s (an all_to_all_single with
  async_op=True, the list from `batch_isend_irecv`, several stages). `wait()` waits every Work;
  `done()` polls `Work.is_completed()`; `elapsed_ms()`: on CPU the host time from construction
  to the first poll or wait that found every Work complete (the overlap engine polls while it
  drains, so this is close to completion; unpolled it is an upper bound); on CUDA NCCL's own
  duration of a single collective when collective timing is on for its group, else None.
- `EventHandle(start, end, out)`: rows produced on an exchange's own CUDA stream between two
  timing events; `wait()` orders the caller's stream after `end`, `done()` queries it,
  `elapsed_ms()` is the time between the events.
A plug-in exchange returns one of these (or its own `Handle`) from `move`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from braid.exchange.base import Handle


class WorksHandle(Handle):
    """Rows that arrive in `out` once every Work in `works` completes; `finish(out)` (optional)
    runs after the last wait, e.g. to copy pieces into place, and returns the rows."""

    def __init__(
        self,
        works: Sequence[Any],
        out: Tensor,
        finish: Callable[[Tensor], Tensor] | None = None,
        started: float | None = None,
    ):
        self.works, self.out, self.finish = list(works), out, finish
        self.cuda = out.is_cuda
        self.started = time.perf_counter() if started is None else started
        self.completed: float | None = None

    def done(self) -> bool:
        if self.completed is not None:
            return True
        if all(w.is_completed() for w in self.works):
            self.completed = time.perf_counter()
            return True
        return False

    def wait(self) -> Tensor:
        for w in self.works:
            w.wait()
        if self.completed is None:
            self.completed = time.perf_counter()
        out = self.out if self.finish is None else self.finish(self.out)
        self.out, self.finish = out, None
        return out

    def elapsed_ms(self) -> float | None:
        if not self.cuda:
            return None if self.completed is None else 1e3 * (self.completed - self.started)
        if len(self.works) != 1:
            return None  # several collectives on several streams: no single duration
        try:
            return float(self.works[0]._get_duration())  # needs collective timing on the group
        except (AttributeError, RuntimeError):
            return None


class EventHandle(Handle):
    """Rows produced on an exchange's own stream between the timing events `start` and `end`."""

    def __init__(self, start: torch.cuda.Event | None, end: torch.cuda.Event, out: Tensor):
        self.start, self.end, self.out = start, end, out

    def done(self) -> bool:
        return self.end.query()

    def wait(self) -> Tensor:
        torch.cuda.current_stream(self.out.device).wait_event(self.end)
        return self.out

    def elapsed_ms(self) -> float | None:
        return None if self.start is None else self.start.elapsed_time(self.end)
