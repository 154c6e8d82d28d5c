"""Exchanges move routed rows between expert-parallel ranks; see `base.py` for the contract.

Registered by name (`exchange.algorithm`), at import: nccl, hierarchical, symmetric, auto, and
simulated (one process: the local exchange that takes the time of a real one). A user class
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
from braid.registry import Registry, is_dotted

if TYPE_CHECKING:
    from braid.exchange.base import Exchange
    from braid.exchange.config import ExchangeConfig

EXCHANGES: Registry = Registry("exchange")

ExchangeFactory = Callable[..., "Exchange"]


def _register_builtins() -> None:
    """Every built-in, registered when `braid.exchange` is imported (their modules import only
    `braid.exchange.base`/`config`/`handles` and `braid.overlap.streams`, never this package)."""
    from braid.exchange.auto import AutoExchange
    from braid.exchange.base import Exchange
    from braid.exchange.hierarchical import HierarchicalExchange
    from braid.exchange.nccl import NcclExchange
    from braid.exchange.simulated import SimulatedExchange
    from braid.exchange.symmetric import SymmetricExchange

    for name, cls in (
        ("nccl", NcclExchange),
        ("hierarchical", HierarchicalExchange),
        ("symmetric", SymmetricExchange),
        ("auto", AutoExchange),
        ("simulated", SimulatedExchange),
    ):
        EXCHANGES.register(name)(cls)
    EXCHANGES.base = Exchange  # what a dotted plug-in must subclass


_register_builtins()


def get_exchange(name: str, *, allow_import: bool = True) -> ExchangeFactory:
    """Factory for exchange `name`: `(ep_group, world_group, cfg) -> Exchange` with cfg's
    compressor attached (a registered name or `package.module:Class`). Braid's own builders
    pass `allow_import=False`: a dotted exchange or compressor must then have been imported
    when the user's config was validated, never by a config that is data (braid.registry)."""
    cls = EXCHANGES.get(name, allow_import=allow_import)

    def build(ep_group, world_group, cfg: ExchangeConfig | None = None) -> Exchange:
        from braid.exchange.compress import with_compressor
        from braid.exchange.config import ExchangeConfig

        cfg = cfg if cfg is not None else ExchangeConfig()
        return with_compressor(cls(ep_group, world_group, cfg), cfg, allow_import=allow_import)

    build.exchange_class = cls  # type: ignore[attr-defined]
    return build


def validate_names(cfg: ExchangeConfig, *, imports: bool = True) -> None:
    """Config-time check that `exchange.algorithm`, `exchange.compressor` and the auto
    candidates resolve. With `imports=False` (a config read from a checkpoint or a model
    directory) dotted plug-in paths are left as data: never imported, only reported by
    `plugin_paths`."""
    from braid.exchange.compress import get_compressor

    names = [
        ("exchange.algorithm", cfg.algorithm, get_exchange),
        ("exchange.compressor", cfg.compressor, get_compressor),
    ]
    names += [("exchange.auto_candidates", n, get_exchange) for n in cfg.auto_candidates]
    for key, value, lookup in names:
        if not imports and is_dotted(value):
            continue
        try:
            lookup(value)
        except BraidError as e:
            shown = cfg.auto_candidates if key == "exchange.auto_candidates" else value
            raise ConfigError(key, shown, str(e)) from None


def plugin_paths(cfg: ExchangeConfig) -> list[str]:
    """The dotted plug-in paths (user code) that `cfg` names."""
    return [n for n in (cfg.algorithm, cfg.compressor, *cfg.auto_candidates) if is_dotted(n)]
