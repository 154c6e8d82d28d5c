"""Single-process simulation of a compressing exchange: the dispatcher's rows are compressed
straight-through, exactly as `CompressedExchange` does to them across ranks (compressors work
row by row, so compressing a token's row before the copy equals compressing each copy)."""

from __future__ import annotations

from torch import nn

from braid.exchange.compress import get_compressor, straight_through
from braid.exchange.config import ExchangeConfig


class SimulatedDispatcher:
    """Wraps a dispatcher: rows compressed straight-through on dispatch (and combine)."""

    def __init__(self, inner, cfg: ExchangeConfig):
        self.inner, self.cfg = inner, cfg
        self.compressor = get_compressor(cfg.compressor)(cfg)
        self.exchange = inner.exchange

    def __getattr__(self, name):  # plan and the rest: the inner dispatcher's
        if name.startswith("__") or name == "inner":  # copy/pickle probe before __init__
            raise AttributeError(name)
        return getattr(self.inner, name)

    def dispatch(self, x_ND, route):
        return self.inner.dispatch(straight_through(x_ND, self.compressor), route)

    def combine(self, y_RD, gates_NK, route):
        if self.cfg.compress_combine:
            y_RD = straight_through(y_RD, self.compressor)
        return self.inner.combine(y_RD, gates_NK, route)


def simulate_compression(model: nn.Module, cfg: ExchangeConfig) -> nn.Module:
    """Install `SimulatedDispatcher` in every MoE layer of `model` (in place)."""
    from braid.moe.layer import MoE

    if cfg.compressor != "none":
        for m in model.modules():
            if isinstance(m, MoE):
                m.dispatcher = SimulatedDispatcher(m.dispatcher, cfg)
    return model
