"""Reading a per-rank metrics file: the SQL and the derived numbers `braid report` and `braid dash`
share (smoothing, heatmap binning, expert imbalance, the per-layer overlap table).

Contract: `open_read(path, wait_s)` opens the DuckDB file read-only, retrying while the writer
holds its lock for at most `wait_s` seconds, then raises duckdb.Error. The `query_*` functions
run on such a connection and accept `since_wall` / `after_step` to fetch only the rows a reader
has not seen; the `*_from_*` functions turn their rows into the shapes read.py documents:

    metrics      name -> [(step, value), ...] sorted by step, the latest value of a step kept
    expert load  layer -> (steps [S] int64, fractions [S, E] float64, NaN where missing)

A file without a table yet reads as empty. Nothing here writes. Every connection (`connect`,
the writer's too) has DuckDB's file system and extensions switched off: a metrics file is data,
and a view stored in it that reads another file fails with duckdb.PermissionException.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from braid.metrics import names

Series = list[tuple[int, float]]
Loads = dict[int, tuple[np.ndarray, np.ndarray]]


# A metrics file is data: a view stored in it must not read other files or the network, and no
# extension is loaded or installed on its behalf. Locked, so no statement can turn them back on.
SAFE_CONFIG = {
    "enable_external_access": False,
    "autoload_known_extensions": False,
    "autoinstall_known_extensions": False,
    "lock_configuration": True,
}


def connect(path: Path, read_only: bool) -> Any:
    """A DuckDB connection to the metrics file `path` that reaches nothing outside it."""
    return duckdb.connect(str(path), read_only=read_only, config=dict(SAFE_CONFIG))


def open_read(path: Path, wait_s: float) -> Any:
    """A read-only connection to `path`; retries every 20 ms for `wait_s` while it is locked."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return connect(path, read_only=True)
        except duckdb.Error:  # most likely the writer holds the lock for a moment
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def query_metrics(con: Any, since_wall: float | None = None) -> dict[str, np.ndarray]:
    """Columns name, step, value, wall (numpy) with one row per (name, step): the value with
    the latest wall_time (a resumed run logs a step again). With `since_wall`, only rows whose
    wall_time >= it (rows of one log call share a wall time, so none is cut in half)."""
    where = "" if since_wall is None else "WHERE wall_time >= ?"
    sql = (
        "SELECT name, step, arg_max(value, wall_time) AS value, max(wall_time) AS wall "
        f"FROM metrics {where} GROUP BY name, step ORDER BY name, step"
    )
    try:
        cols = con.execute(sql, [] if since_wall is None else [since_wall]).fetchnumpy()
    except duckdb.CatalogException:  # no table yet
        return {
            "name": np.array([], dtype=object),
            "step": np.array([], dtype=np.int64),
            "value": np.array([], dtype=np.float64),
            "wall": np.array([], dtype=np.float64),
        }
    return {
        "name": np.asarray(cols["name"], dtype=object),
        "step": np.asarray(cols["step"], dtype=np.int64),
        "value": _filled(cols["value"]),
        "wall": _filled(cols["wall"]),
    }


def metrics_from_columns(cols: dict[str, np.ndarray]) -> dict[str, Series]:
    """name -> [(step, value), ...] from `query_metrics` columns (sorted by name, step)."""
    out: dict[str, Series] = {}
    for name, step, value in zip(cols["name"], cols["step"], cols["value"], strict=True):
        out.setdefault(str(name), []).append((int(step), float(value)))
    return out


def query_expert_load(con: Any, after_step: int | None = None) -> dict[str, np.ndarray]:
    """Columns layer, step, expert, fraction; a (step, layer, expert) logged twice is averaged.
    With `after_step`, only steps > it."""
    where = "" if after_step is None else "WHERE step > ?"
    sql = (
        "SELECT layer, step, expert, avg(fraction) AS fraction FROM expert_load "
        f"{where} GROUP BY layer, step, expert ORDER BY layer, step, expert"
    )
    try:
        cols = con.execute(sql, [] if after_step is None else [int(after_step)]).fetchnumpy()
    except duckdb.CatalogException:
        cols = {k: [] for k in ("layer", "step", "expert", "fraction")}
    out = {k: np.asarray(cols[k], dtype=np.int64) for k in ("layer", "step", "expert")}
    out["fraction"] = _filled(cols["fraction"])
    return out


def loads_from_columns(cols: dict[str, np.ndarray]) -> Loads:
    """layer -> (steps [S], fractions [S, E]) from `query_expert_load` columns."""
    layer, step, expert, fraction = (cols[k] for k in ("layer", "step", "expert", "fraction"))
    out: Loads = {}
    for lay in np.unique(layer):
        sel = layer == lay
        steps, row = np.unique(step[sel], return_inverse=True)
        grid = np.full((len(steps), int(expert[sel].max()) + 1), np.nan)
        grid[row, expert[sel]] = fraction[sel]
        out[int(lay)] = (steps, grid)
    return out


def _filled(col: Any) -> np.ndarray:
    """A float64 array with SQL NULLs (masked entries) as NaN."""
    return np.ma.filled(np.ma.asarray(col, dtype=np.float64), np.nan)


# -- derived numbers ------------------------------------------------------------------------------


def smooth(y: np.ndarray) -> np.ndarray:
    """Bias-corrected EMA with a span of ~2% of the points; NaNs are skipped."""
    span = max(2.0, len(y) / 50)
    a = 2.0 / (span + 1.0)
    out = np.full(len(y), np.nan)
    m, w = 0.0, 0.0
    for i, v in enumerate(np.asarray(y, dtype=np.float64)):
        if math.isfinite(v):
            m, w = (1 - a) * m + a * v, (1 - a) * w + a
        if w:
            out[i] = m / w
    return out


def bin_columns(
    steps: np.ndarray, grid: np.ndarray, max_columns: int
) -> tuple[np.ndarray, np.ndarray]:
    """Average runs of consecutive steps so a heatmap has at most `max_columns` step columns."""
    n = len(steps)
    if n <= max_columns:
        return steps.astype(np.float64), grid
    edges = np.linspace(0, n, max_columns + 1).astype(int)
    pairs = list(zip(edges[:-1], edges[1:], strict=True))
    xs = np.array([steps[a:b].mean() for a, b in pairs])
    with np.errstate(all="ignore"):
        cols = [np.nanmean(grid[a:b], axis=0) for a, b in pairs]
    return xs, np.stack(cols)


def imbalance(grid: np.ndarray) -> np.ndarray:
    """Per step (row): the largest expert share over the mean share (1 = perfectly balanced)."""
    with np.errstate(all="ignore"):
        return np.nanmax(grid, axis=1) / np.nanmean(grid, axis=1)


def overlap_by_layer(metrics: dict[str, Series]) -> dict[int, dict[str, float]]:
    """layer -> {exchange_ms, exposed_ms, hidden_ms}: medians over the logged steps of the
    `overlap/exchange_ms|exposed_ms/layer<i>` metrics; hidden = exchange - exposed."""
    per_layer: dict[int, dict[str, float]] = {}
    for name, series in metrics.items():
        parts = names.overlap_parts(name)
        if parts is None or parts[0] not in (names.OVERLAP_EXCHANGE, names.OVERLAP_EXPOSED):
            continue
        vals = np.array([v for _, v in series], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        if vals.size:
            per_layer.setdefault(parts[1], {})[parts[0]] = float(np.median(vals))
    for d in per_layer.values():
        ex, xp = d.get(names.OVERLAP_EXCHANGE), d.get(names.OVERLAP_EXPOSED)
        if ex is not None and xp is not None:
            d["hidden_ms"] = max(ex - xp, 0.0)
    return dict(sorted(per_layer.items()))
