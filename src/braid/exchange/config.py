"""The `[exchange]` section: how routed tokens travel between expert-parallel ranks."""

from __future__ import annotations

from dataclasses import dataclass

from braid.knobs import check, knob


@dataclass(frozen=True, kw_only=True)
class ExchangeConfig:
    algorithm: str = knob("nccl", "Exchange used when parallel.ep > 1 (see braid.exchange).")
    compressor: str = knob("none", "Payload compressor for dispatch (see braid.exchange.compress).")
    node_size: int = knob(0, "Ranks per node for the hierarchical exchange; 0 = local world size.")

    def validate(self) -> None:
        check(self.node_size >= 0, "exchange.node_size", self.node_size, "must be >= 0")
