"""The `[checkpoint]` section: when checkpoints are written, how many are kept, how to resume."""

from __future__ import annotations

from dataclasses import dataclass

from braid.knobs import check, knob


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    every: int = knob(
        100,
        "Write a checkpoint every n steps (0: none on the way); one is always written at the end,"
        " at train.stop_at and on SIGTERM.",
    )
    resume: str = knob("auto", "auto (latest in run dir if any), none, or a checkpoint path.")
    init_from: str = knob(
        "",
        "A Braid model directory (braid import / braid export) whose weights start a new run at"
        " step 0 with a fresh optimizer; a checkpoint of the run itself takes precedence.",
    )
    keep_last: int = knob(2, "Keep the newest k checkpoints.")
    keep_every: int = knob(0, "Also keep every checkpoint whose step is a multiple of m (0: none).")
    allow_safe_changes: bool = knob(
        False, "Resume even if safe keys changed (steps, schedule length, logging cadence)."
    )

    def validate(self) -> None:
        check(self.every >= 0, "checkpoint.every", self.every, "must be >= 0")
        check(self.keep_last >= 1, "checkpoint.keep_last", self.keep_last, "must be >= 1")
        check(self.keep_every >= 0, "checkpoint.keep_every", self.keep_every, "must be >= 0")
        check(self.resume != "", "checkpoint.resume", self.resume, "auto, none or a path")
