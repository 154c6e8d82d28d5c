"""A tiny name -> object registry for plug-in points (exchanges, compressors, schedules).

Lookups of unknown names fail with the list of valid names. A name containing ':' or a dot path
(`package.module:attr` or `package.module.attr`) is imported, so users can plug in their own
implementation without touching Braid, but only when the name comes from the user (the command
line, a config file given to `braid train`, or Python code that calls `get`): validating a user's
config imports its plug-ins (`Config.validate()`), and the registry keeps what it imported.
Whatever builds objects from a config (exchanges, their compressors) looks names up with
`get(name, allow_import=False)`, which returns a registered or already imported plug-in and
refuses any other dotted name: a config read from a checkpoint or a model directory is data,
validated without imports, so nothing it names is ever imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

from braid.errors import BraidError, first_line

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, base: type | None = None):
        """`base`: the class every plug-in must subclass (checked when a dotted name is
        imported)."""
        self.kind, self.base = kind, base
        self._items: dict[str, T] = {}
        self._imported: dict[str, T] = {}  # dotted names a user's config or code imported

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str, *, allow_import: bool = True) -> T:
        if name in self._items:
            return self._items[name]
        if is_dotted(name):
            if name in self._imported:
                return self._imported[name]
            if not allow_import:
                raise BraidError(
                    f"{self.kind} {name!r} is a plug-in that was not imported: a saved config "
                    "is data and never imports code; name it on the command line or in the "
                    "config file given to braid (or call Config.validate()) to use it"
                )
            self._imported[name] = obj = _import_path(name, self.kind, self.base)
            return obj
        raise BraidError(
            f"unknown {self.kind} {name!r}: expected one of {', '.join(self.names())} "
            "or a dotted import path (package.module:Name)"
        )


def is_dotted(name: str) -> bool:
    """A user plug-in path (`pkg.mod:Name` or `pkg.mod.Name`) rather than a registered name."""
    return "." in name or ":" in name


def _import_path(path: str, kind: str, base: type | None = None):
    module, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except Exception as e:  # ImportError, AttributeError, or whatever the module raises
        raise BraidError(
            f"cannot import {kind} {path!r}: {type(e).__name__}: {first_line(e)}"
        ) from None
    if base is not None and not (isinstance(obj, type) and issubclass(obj, base)):
        raise BraidError(
            f"{kind} {path!r} is not a subclass of {base.__module__}.{base.__qualname__}"
        )
    return obj
