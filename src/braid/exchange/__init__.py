"""Exchanges move routed rows between expert-parallel ranks; see `base.py` for the contract.

Registered by name (`exchange.algorithm`): nccl, hierarchical, symmetric, auto. A user class
can be named by dotted path (`mypkg.mymod:MyExchange`). `get_exchange(name)` returns a factory
called as `factory(ep_group, world_group, cfg)`: it builds the exchange and attaches the
configured payload compressor (`exchange.compressor`, see `braid.exchange.compress`), so
compression works with every exchange, plug-ins included. `EXCHANGES.get(name)` is the bare
class. docs/exchange.md shows how to write and register a plug-in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from braid.errors import BraidError, ConfigError
from braid.registry import Registry

if TYPE_CHECKING:
    from braid.exchange.base import Exchange
    from braid.exchange.config import ExchangeConfig

EXCHANGES: Registry = Registry("exchange")

ExchangeFactory = Callable[..., "Exchange"]


def _register_builtins() -> None:
    from braid.exchange.auto import AutoExchange
    from braid.exchange.hierarchical import HierarchicalExchange
    from braid.exchange.nccl import NcclExchange
    from braid.exchange.symmetric import SymmetricExchange

    EXCHANGES.register("nccl")(NcclExchange)
    EXCHANGES.register("hierarchical")(HierarchicalExchange)
    EXCHANGES.register("symmetric")(SymmetricExchange)
    EXCHANGES.register("auto")(AutoExchange)


def get_exchange(name: str) -> ExchangeFactory:
    """Factory for exchange `name`: `(ep_group, world_group, cfg) -> Exchange` with cfg's
    compressor attached (a registered name or `package.module:Class`)."""
    if not EXCHANGES.names():
        _register_builtins()
    cls = EXCHANGES.get(name)

    def build(ep_group, world_group, cfg: ExchangeConfig | None = None) -> Exchange:
        from braid.exchange.compress import with_compressor
        from braid.exchange.config import ExchangeConfig

        cfg = cfg if cfg is not None else ExchangeConfig()
        return with_compressor(cls(ep_group, world_group, cfg), cfg)

    build.exchange_class = cls  # type: ignore[attr-defined]
    return build


def validate_names(cfg: ExchangeConfig) -> None:
    """Config-time check that `exchange.algorithm` and `exchange.compressor` resolve."""
    from braid.exchange.compress import get_compressor

    for key, value, lookup in (
        ("exchange.algorithm", cfg.algorithm, get_exchange),
        ("exchange.compressor", cfg.compressor, get_compressor),
    ):
        try:
            lookup(value)
        except BraidError as e:
            raise ConfigError(key, value, str(e)) from None
    for name in cfg.auto_candidates:
        try:
            get_exchange(name)
        except BraidError as e:
            raise ConfigError("exchange.auto_candidates", cfg.auto_candidates, str(e)) from None
