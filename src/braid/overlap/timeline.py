"""Per-layer timeline of the overlap engine: named ranges for traces, and exposed communication.

Job: while a profiler runs, every piece of work the pipeline does runs inside a
`record_function` range named
`moe{i}/<kind>` (kinds: forward, backward, dispatch_a2a, combine_a2a, experts, experts_bwd,
shared, shared_bwd, dW (drained in a window), dW_flush (at a flush point), dense_dW and
dense_dW_flush (split_dw = "all": the blocks above, `braid.overlap.dense`), and
`<exchange>_wait`), so a torch.profiler Chrome trace of one step
shows each MoE layer's exchanges, expert GEMMs and deferred dW on their streams. When `timing`
is on (report steps), the same places are also stamped on the compute stream
(`braid.overlap.streams.Clock`) and summarised per layer:
- exposed_ms: time the compute stream waits on an exchange, i.e. inside `handle.wait()` after
  the dW drain (CUDA: events just before and after the wait, so the gap is the stream stall;
  CPU/gloo: host time blocked in the wait);
- exchange_ms: issue to completion of each exchange, summed: the handle's own measurement
  (`Handle.elapsed_ms()`: NCCL's duration when collective timing is on, CUDA events of an
  exchange's stream, or host stamps on CPU), else issue to the end of the wait (an upper bound);
- forward_ms/backward_ms: the pipelined region; measured_ms = forward + backward + dW_flush
  (backward includes dense_dW drained in its windows; dense_dW_flush is not the layer's work).
Values are per micro-step (averaged over the forwards recorded since the last `summary`).

Phases: record (during the step, no host syncs) -> `summary()` after `streams.synchronize`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.profiler import record_function

from braid.overlap.streams import Clock, InFlight


@dataclass
class _Exchange:
    kind: str
    issued: Any
    handle: Any  # braid.exchange.base.Handle
    waited: Any = None


def _range(name: str) -> Any:
    """A `record_function` range while a profiler is on; otherwise nothing: entering one costs
    several microseconds of CPU even with no profiler, paid by every range of every chunk."""
    return record_function(name) if torch.autograd._profiler_enabled() else nullcontext()


class LayerTimeline:
    """Named ranges (always) and compute-stream stamps (when `timing`) for one MoE layer."""

    def __init__(self, layer: int, clock: Clock):
        self.prefix, self.clock = f"moe{layer}", clock
        self.timing = False
        self._spans: list[tuple[str, Any, Any]] = []
        self._waits: list[tuple[Any, Any]] = []
        self._exchanges: list[_Exchange] = []
        self.num_forward = 0

    @contextmanager
    def span(self, kind: str) -> Iterator[None]:
        with _range(f"{self.prefix}/{kind}"):
            if not self.timing:
                yield
                return
            start = self.clock.mark()
            yield
            self._spans.append((kind, start, self.clock.mark()))

    def issue(self, kind: str, go: Callable[[], Any], send: Tensor) -> InFlight:
        """Start an exchange (`go()` returns its handle); the send buffer rides with the handle."""
        with _range(f"{self.prefix}/{kind}"):
            issued = self.clock.mark() if self.timing else None
            fl = InFlight(go(), send, kind)
        if self.timing:
            fl.record = _Exchange(kind, issued, fl.handle)
        return fl

    def wait(self, fl: InFlight, drain: Callable[[Any], int] | None = None) -> Tensor:
        """Drain queued dW while the exchange is in flight, then wait for it (exposed time)."""
        with _range(f"{self.prefix}/{fl.kind}_wait"):
            if drain is not None:
                drain(fl.handle)
            before = self.clock.mark() if self.timing else None
            out = fl.wait()
            if self.timing:
                after = self.clock.mark()
                self._waits.append((before, after))
                if fl.record is not None:
                    fl.record.waited = after
                    self._exchanges.append(fl.record)
        return out

    def summary(self) -> dict[str, float]:
        """Per-micro-step means since the last call (the device must be synchronized); resets."""
        n = max(self.num_forward, 1)
        out: dict[str, float] = {}
        for kind, a, b in self._spans:
            key = f"{kind}_ms"
            out[key] = out.get(key, 0.0) + self.clock.ms(a, b)
        out["exposed_ms"] = sum(self.clock.ms(a, b) for a, b in self._waits)
        out["exchange_ms"] = sum(self._exchange_ms(x) for x in self._exchanges)
        out = {k: v / n for k, v in out.items()}
        parts = ("forward_ms", "backward_ms", "dW_flush_ms")  # flushed dW runs after backward
        out["measured_ms"] = sum(out.get(k, 0.0) for k in parts)
        self._spans, self._waits, self._exchanges, self.num_forward = [], [], [], 0
        return out

    def _exchange_ms(self, x: _Exchange) -> float:
        own = x.handle.elapsed_ms()
        return self.clock.ms(x.issued, x.waited) if own is None else own


def format_summary(step: int, rows: dict[int, dict[str, float]], plans: dict[int, Any]) -> str:
    """The `overlap.report` table: one line per MoE layer."""
    head = (
        f"overlap @ step {step}: layer  C  split  exchange_ms  exposed_ms  exposed%  "
        "dW_ms  measured_ms  predicted_ms"
    )
    dense = any("dense_dW_ms" in r or "dense_dW_flush_ms" in r for r in rows.values())
    if dense:  # split_dw = "all": the dW of the blocks above, in the windows + flushed
        head += "  dense_dW_ms"
    lines = [head]
    for i, r in sorted(rows.items()):
        p = plans[i]
        ex, exp = r.get("exchange_ms", 0.0), r.get("exposed_ms", 0.0)
        frac = 100 * exp / ex if ex > 0 else 0.0
        dw = r.get("dW_ms", 0.0) + r.get("dW_flush_ms", 0.0)
        pred = "-" if p.predicted_ms is None else f"{p.predicted_ms:.3f}"
        lines.append(
            f"  moe{i:<3} {p.chunks:>3}  {'on ' if p.split_dw else 'off'}  {ex:11.3f}  {exp:10.3f}"
            f"  {frac:7.1f}%  {dw:6.3f}  {r['measured_ms']:11.3f}  {pred:>12}"
        )
        if dense:
            lines[-1] += f"  {r.get('dense_dW_ms', 0.0) + r.get('dense_dW_flush_ms', 0.0):11.3f}"
    return "\n".join(lines)
