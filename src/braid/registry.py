"""A tiny name -> object registry for plug-in points (exchanges, compressors, schedules).

Lookups of unknown names fail with the list of valid names. A name containing ':' or a dot path
(`package.module:attr` or `package.module.attr`) is imported, so users can plug in their own
implementation without touching Braid.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

from braid.errors import BraidError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str) -> T:
        if name in self._items:
            return self._items[name]
        if "." in name or ":" in name:
            return _import_path(name, self.kind)
        raise BraidError(
            f"unknown {self.kind} {name!r}: expected one of {', '.join(self.names())} "
            "or a dotted import path (package.module:Name)"
        )


def _import_path(path: str, kind: str):
    module, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise BraidError(f"cannot import {kind} {path!r}: {e}") from None
