"""Helpers for config sections: every knob is a dataclass field with a default and a docstring.

Sections are frozen keyword-only dataclasses that live next to the package that owns them
(`[moe]` in `braid/moe/config.py`). `knob(default, doc)` attaches the documentation that
`braid info --knobs` and docs/config.md print; `check(...)` raises the one-line ConfigError.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

from braid.errors import ConfigError


def knob(default: Any, doc: str) -> Any:
    """A config field with `default` (lists are copied per instance) and a one-line `doc`."""
    if isinstance(default, list):
        return field(default_factory=lambda d=tuple(default): list(d), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ConfigError(key, value, allowed) unless `ok`."""
    if not ok:
        raise ConfigError(key, value, allowed)


def one_of(key: str, value: Any, choices: tuple | list) -> None:
    check(value in choices, key, value, "expected one of " + ", ".join(map(str, choices)))
