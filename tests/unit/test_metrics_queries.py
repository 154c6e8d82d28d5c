"""metrics/queries.py against naive references: smoothing, heatmap binning, imbalance, the
overlap table, and reading only the rows newer than a wall time."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from braid.metrics import MetricsWriter, metrics_path, names, queries, read_metrics


def _ema_reference(y: list[float]) -> list[float]:
    """The smoothed value at i as an explicit weighted mean: the k-th finite value before it
    (counting from i backwards, k = 0 newest) weighs a * (1 - a)^k, normalized by the weights."""
    span = max(2.0, len(y) / 50)
    a = 2.0 / (span + 1.0)
    out = []
    for i in range(len(y)):
        seen = [v for v in y[: i + 1] if math.isfinite(v)][::-1]
        w = [a * (1 - a) ** k for k in range(len(seen))]
        out.append(
            sum(wk * v for wk, v in zip(w, seen, strict=True)) / sum(w) if seen else math.nan
        )
    return out


def test_smooth_is_the_bias_corrected_ema_skipping_nans() -> None:
    rng = np.random.default_rng(0)
    y = list(rng.normal(3.0, 1.0, 300))
    y[0], y[17], y[120] = math.nan, math.nan, math.inf
    got = queries.smooth(np.array(y))
    want = _ema_reference(y)
    assert math.isnan(got[0]) and math.isnan(want[0])
    np.testing.assert_allclose(got[1:], want[1:], rtol=1e-12)


def test_bin_columns_averages_consecutive_steps() -> None:
    steps = np.arange(10, 1010, 10)
    grid = np.arange(200, dtype=np.float64).reshape(100, 2)
    grid[5, 1] = np.nan
    xs, g = queries.bin_columns(steps, grid, 7)
    edges = np.linspace(0, 100, 8).astype(int)
    for j, (a, b) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        assert xs[j] == steps[a:b].mean()
        for e in range(2):
            col = [v for v in grid[a:b, e] if not math.isnan(v)]
            assert g[j, e] == sum(col) / len(col)
    same_x, same_g = queries.bin_columns(steps, grid, 100)
    assert (same_x == steps).all() and same_g is grid


def test_imbalance_is_max_over_mean_share() -> None:
    grid = np.array([[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1], [0.5, np.nan, 0.5, 0.0]])
    np.testing.assert_allclose(queries.imbalance(grid), [1.0, 2.8, 0.5 / (1 / 3)])


def test_overlap_by_layer_takes_medians_and_hidden_time() -> None:
    metrics = {
        names.overlap_name("exchange_ms", 2): [(1, 4.0), (2, 6.0), (3, math.nan), (4, 5.0)],
        names.overlap_name("exposed_ms", 2): [(1, 1.0), (2, 3.0), (4, 2.0)],
        names.overlap_name("exposed_ms", 0): [(1, 0.5)],
        names.overlap_name("measured_ms", 0): [(1, 9.0)],
        "train/loss": [(1, 3.0)],
    }
    got = queries.overlap_by_layer(metrics)
    assert list(got) == [0, 2]
    assert got[2] == {"exchange_ms": 5.0, "exposed_ms": 2.0, "hidden_ms": 3.0}
    assert got[0] == {"exposed_ms": 0.5}  # no exchange time logged: no hidden time either


def test_query_metrics_since_wall_returns_only_newer_rows(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, 0) as w:
        for s in range(5):
            w.log(s, {"a": float(s), "b": -float(s)})
        w.flush()
        con = queries.open_read(metrics_path(tmp_path), 1.0)
        try:
            first = queries.query_metrics(con)
        finally:
            con.close()
        cut = float(first["wall"].max())
        w.log(4, {"a": 40.0})  # a step logged again later: the newer value wins
        w.log(5, {"a": 5.0})
    con = queries.open_read(metrics_path(tmp_path), 1.0)
    try:
        newer = queries.query_metrics(con, since_wall=cut)
    finally:
        con.close()
    rows = set(
        zip(newer["name"].tolist(), newer["step"].tolist(), newer["value"].tolist(), strict=True)
    )
    assert {("a", 4, 40.0), ("a", 5, 5.0)} <= rows
    assert ("b", 4, -4.0) in rows  # logged at the cut itself: kept (wall_time >= since_wall)
    assert all(w >= cut for w in newer["wall"])  # nothing older than the cut
    assert ("a", 3, 3.0) not in rows
    assert read_metrics(tmp_path)["a"][-2:] == [(4, 40.0), (5, 5.0)]


def test_a_view_stored_in_a_metrics_file_cannot_read_other_files(tmp_path: Path) -> None:
    """A metrics file is data: a `metrics` view over read_text() must not hand another file's
    contents to the report or the dashboard; the writer's connection is locked down too."""
    import duckdb
    import pytest

    from braid.dash import data as dash_data
    from braid.errors import BraidError

    secret = tmp_path / "secret.txt"
    secret.write_text("TOKEN=hunter2")
    path = metrics_path(tmp_path / "run", 0)
    path.parent.mkdir(parents=True)
    con = duckdb.connect(str(path))
    con.execute(
        "CREATE VIEW metrics AS SELECT content AS name, 0::BIGINT AS step, 1.0::DOUBLE AS value, "
        f"0.0::DOUBLE AS wall_time FROM read_text('{secret}')"
    )
    con.close()
    with pytest.raises(BraidError, match="cannot read .*Permission") as e:
        read_metrics(tmp_path / "run")
    assert "hunter2" not in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(duckdb.PermissionException):
        dash_data._read_copy(path)
    snap = dash_data._Snapshot()
    stale, note = dash_data._refresh(path, snap, 0.0)
    assert stale and note.startswith("metrics file refused") and not snap.series
    con = queries.connect(path, read_only=False)  # the writer's connection
    with pytest.raises(duckdb.Error):
        con.execute("SET enable_external_access = true")
    con.close()
