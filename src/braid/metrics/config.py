"""The `[metrics]` section: what is recorded and where."""

from __future__ import annotations

from dataclasses import dataclass

from braid.knobs import check, knob


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    flush_every: int = knob(50, "Write buffered metric rows to DuckDB every n steps.")
    expert_load: bool = knob(True, "Record each MoE layer's per-expert token share.")
    tensorboard: bool = knob(False, "Also write TensorBoard event files (needs tensorboard).")

    def validate(self) -> None:
        check(self.flush_every > 0, "metrics.flush_every", self.flush_every, "must be > 0")
