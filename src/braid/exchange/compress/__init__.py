"""Payload compressors for the dispatch (and optionally combine) payloads; see `base.py`.

Registered by name (`exchange.compressor`): none, bf16, int8, fp8. A user class can be named by
dotted path (`mypkg.mymod:MyCompressor`); it subclasses `Compressor` and is built as `cls(cfg)`.
`with_compressor(exchange, cfg)` attaches the configured one to any exchange.
"""

from __future__ import annotations

from braid.exchange.compress.base import Compressor, NoCompressor, straight_through
from braid.exchange.compress.bf16 import Bf16Compressor
from braid.exchange.compress.fp8 import Fp8Compressor
from braid.exchange.compress.int8 import Int8Compressor
from braid.exchange.compress.wrap import CompressedExchange, with_compressor
from braid.registry import Registry

COMPRESSORS: Registry = Registry("compressor", Compressor)
for _cls in (NoCompressor, Bf16Compressor, Int8Compressor, Fp8Compressor):
    COMPRESSORS.register(_cls.name)(_cls)


def get_compressor(name: str, *, allow_import: bool = True) -> type[Compressor]:
    """The compressor class named `name` (a registered name or `package.module:Class`;
    `allow_import=False`: only one already imported, see braid.registry)."""
    return COMPRESSORS.get(name, allow_import=allow_import)


__all__ = [
    "COMPRESSORS",
    "CompressedExchange",
    "Compressor",
    "get_compressor",
    "straight_through",
    "with_compressor",
]
