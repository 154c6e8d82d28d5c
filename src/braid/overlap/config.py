"""The `[overlap]` section: hiding the exchange behind computation."""

from __future__ import annotations

from dataclasses import dataclass

from braid.knobs import check, knob


@dataclass(frozen=True, kw_only=True)
class OverlapConfig:
    split_dw: bool = knob(False, "Compute input grads first and run weight grads during exchanges.")
    chunks: int | str = knob(1, "Pipeline chunks per MoE layer: 1 (plain), n, or \"auto\".")

    def validate(self) -> None:
        ok = self.chunks == "auto" or (isinstance(self.chunks, int) and self.chunks >= 1)
        check(ok, "overlap.chunks", self.chunks, 'must be an integer >= 1 or "auto"')
