"""The `[data]` section: where token shards are read from."""

from __future__ import annotations

from dataclasses import dataclass

from braid.knobs import check, knob, one_of


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    path: str = knob(
        "", "Directory of prepared shards (manifest.json); empty uses the built-in corpus."
    )
    tokenizer: str = knob(
        "", "For the built-in corpus: a tokenizer.json to use; empty trains a byte-level BPE."
    )
    val_fraction: float = knob(0.05, "For the built-in corpus: share of tokens held out.")
    verify: str = knob(
        "auto",
        "Shard sha256 checks at start: auto (splits up to 256 MiB), all (every shard, about "
        "1 GB/s per rank), sizes (sizes and headers only).",
    )

    def validate(self) -> None:
        check(0 < self.val_fraction < 0.5, "data.val_fraction", self.val_fraction, "in (0, 0.5)")
        one_of("data.verify", self.verify, ("auto", "all", "sizes"))
