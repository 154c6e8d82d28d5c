"""Imports go one way: the circles model <-> moe, checkpoint <-> train and parallel/mesh <->
parallel/distributed stay broken, and `braid.overlap` knows handles, never `braid.moe`.

Every import statement of a module counts, at any depth (function-level imports included):
a deferred import still makes a circle, only a later one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "braid"


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def _files(rel: str) -> list[Path]:
    p = SRC / rel
    return sorted(p.rglob("*.py")) if p.is_dir() else [p.with_suffix(".py")]


@pytest.mark.parametrize(
    "importer, forbidden",
    [
        ("moe", "braid.model"),  # model -> moe only
        ("checkpoint", "braid.train"),  # train -> checkpoint only
        ("parallel/mesh", "braid.parallel.distributed"),  # distributed -> mesh only
        ("overlap", "braid.moe"),  # the engine schedules duck-typed dispatcher primitives
        ("exchange", "braid.moe"),
        ("exchange", "braid.model"),
    ],
)
def test_no_import_against_the_layering(importer, forbidden):
    bad = [
        f"{f.relative_to(SRC)}: {m}"
        for f in _files(importer)
        for m in _imports(f)
        if m == forbidden or m.startswith(forbidden + ".")
    ]
    assert bad == []


def test_cuda_streams_are_created_in_one_module():
    made = [
        str(f.relative_to(SRC))
        for f in SRC.rglob("*.py")
        if "cuda.Stream(" in f.read_text() and f != SRC / "overlap" / "streams.py"
    ]
    assert made == []


def test_exchange_builtins_are_registered_at_import():
    import subprocess
    import sys

    code = "from braid.exchange import EXCHANGES; print(' '.join(EXCHANGES.names()))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    assert out == ["auto", "hierarchical", "nccl", "simulated", "symmetric"]
