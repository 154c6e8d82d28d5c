"""The `[overlap]` section: hiding the exchange behind computation (see docs/overlap.md)."""

from __future__ import annotations

from dataclasses import dataclass

from braid.knobs import check, knob


@dataclass(frozen=True, kw_only=True)
class OverlapConfig:
    split_dw: bool = knob(False, "Compute input grads first and run weight grads during exchanges.")
    chunks: int | str = knob(1, 'Pipeline chunks per MoE layer: 1 (plain), n, or "auto".')
    max_chunks: int = knob(8, 'Largest C that chunks="auto" may pick.')
    report: bool = knob(
        False, "Time each MoE layer at log steps; print and log exposed/exchange ms per layer."
    )
    trace_step: int = knob(0, "Write a Chrome trace of this step to the run dir (0: none).")

    def validate(self) -> None:
        ok = self.chunks == "auto" or (isinstance(self.chunks, int) and self.chunks >= 1)
        check(ok, "overlap.chunks", self.chunks, 'must be an integer >= 1 or "auto"')
        check(self.max_chunks >= 1, "overlap.max_chunks", self.max_chunks, "must be >= 1")
        check(self.trace_step >= 0, "overlap.trace_step", self.trace_step, "must be >= 0")
