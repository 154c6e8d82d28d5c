"""The `[data]` section: where token shards are read from."""

from __future__ import annotations

from dataclasses import dataclass

from braid.knobs import check, knob


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    path: str = knob(
        "", "Directory of prepared shards (manifest.json); empty uses the built-in corpus."
    )
    tokenizer: str = knob(
        "", "For the built-in corpus: a tokenizer.json to use; empty trains a byte-level BPE."
    )
    val_fraction: float = knob(0.05, "For the built-in corpus: share of tokens held out.")

    def validate(self) -> None:
        check(0 < self.val_fraction < 0.5, "data.val_fraction", self.val_fraction, "in (0, 0.5)")
