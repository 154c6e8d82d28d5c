"""Metric names and the panels drawn from them: the one list that `braid report` and `braid dash`
both read, so a name changes in one place.

Contract: the constants are the names the trainer logs (train/log.py, overlap/session.py; an
integration test checks a real run writes them). `SERIES_PANELS` are the one-metric panels in
display order; `is_overlap` / `overlap_layer` parse the per-layer `overlap/<kind>/layer<i>`
names; anything under `FP8_PREFIX` is a numerics metric, drawn only when a run logged some.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TRAIN_LOSS = "train/loss"
VAL_LOSS = "val/loss"
LR = "train/lr"
GRAD_NORM = "train/grad_norm"
TOKENS_PER_S = "train/tokens_per_s"
MFU = "train/mfu"
AUX_LOSS = "train/aux_loss"
Z_LOSS = "train/z_loss"
SKIPPED_STEPS = "train/skipped_steps"
DROPPED_PER_MICRO = "train/dropped_per_micro"
LOAD_MAX_OVER_MEAN = "train/load_max_over_mean"

OVERLAP_EXCHANGE = "exchange_ms"  # time the layer's exchanges took
OVERLAP_EXPOSED = "exposed_ms"  # the part of it no compute hid
FP8_PREFIX = "fp8/"

_OVERLAP = re.compile(r"^overlap/([a-zA-Z_]+)/layer(\d+)$")


@dataclass(frozen=True)
class SeriesPanel:
    """One metric over steps: `file` is its PNG in `braid report`, `key` its panel id in the
    dashboard; `smooth` draws a smoothed line over the raw one, `log_y` allows a log axis."""

    key: str
    metric: str
    title: str
    log_y: bool
    smooth: bool

    @property
    def file(self) -> str:
        return f"{self.key}.png"


# Loss (train raw + smoothed, with val) is its own panel; these follow it in this order.
SERIES_PANELS = (
    SeriesPanel("lr", LR, "Learning rate", log_y=False, smooth=False),
    SeriesPanel("tokens_per_s", TOKENS_PER_S, "Throughput (tokens/s)", log_y=False, smooth=True),
    SeriesPanel("grad_norm", GRAD_NORM, "Gradient norm", log_y=True, smooth=True),
    SeriesPanel("mfu", MFU, "Model FLOPs utilization", log_y=False, smooth=True),
    SeriesPanel("aux_loss", AUX_LOSS, "Load-balance (aux) loss", log_y=False, smooth=True),
    SeriesPanel("z_loss", Z_LOSS, "Router z-loss", log_y=False, smooth=True),
    SeriesPanel("skipped_steps", SKIPPED_STEPS, "Skipped steps", log_y=False, smooth=False),
)


def overlap_name(kind: str, layer: int) -> str:
    """`overlap/<kind>/layer<layer>`, e.g. overlap/exposed_ms/layer3."""
    return f"overlap/{kind}/layer{int(layer)}"


def overlap_parts(name: str) -> tuple[str, int] | None:
    """(kind, layer) of an `overlap/<kind>/layer<i>` name, else None."""
    m = _OVERLAP.match(name)
    return None if m is None else (m.group(1), int(m.group(2)))


def is_fp8(name: str) -> bool:
    return name.startswith(FP8_PREFIX)
