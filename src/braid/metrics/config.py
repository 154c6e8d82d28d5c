"""The `[metrics]` section: what is recorded and where, and how often it reaches the disk."""

from __future__ import annotations

from dataclasses import dataclass

from braid.knobs import check, knob, one_of


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    flush_every: int = knob(
        50,
        "Write buffered metric rows to DuckDB once n logged steps are buffered or flush_seconds"
        " passed, whichever is first; also at checkpoints, at the end and on errors.",
    )
    flush_seconds: float = knob(
        5.0, "Write buffered metric rows at least this often (seconds of wall time) while logging."
    )
    expert_load: bool = knob(True, "Record each MoE layer's per-expert token share.")
    tensorboard: bool = knob(False, "Also write TensorBoard event files (needs tensorboard).")
    on_error: str = knob(
        "stop",
        "A metrics file that cannot be written: stop (the run ends with the error, after a"
        " checkpoint) or continue (train on; the run is marked degraded in the registry and the"
        " result JSON).",
    )

    def validate(self) -> None:
        check(self.flush_every > 0, "metrics.flush_every", self.flush_every, "must be > 0")
        check(self.flush_seconds > 0, "metrics.flush_seconds", self.flush_seconds, "must be > 0")
        one_of("metrics.on_error", self.on_error, ("stop", "continue"))
