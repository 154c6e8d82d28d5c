"""MetricsWriter / read_metrics: exact DuckDB schema, buffering, flushing (every n steps or
flush_seconds), crash safety."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest

from braid.errors import BraidError
from braid.metrics import MetricsWriter, metrics_path, read_expert_load, read_metrics


def _count(path: Path, table: str = "metrics") -> int:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    finally:
        con.close()


def test_schema_is_exact(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, 0) as w:
        w.log(1, {"train/loss": 2.5})
        w.log_expert_load(1, 0, [0.5, 0.5])
    path = tmp_path / "metrics" / "rank_0.duckdb"
    assert path == metrics_path(tmp_path, 0) and path.is_file()
    con = duckdb.connect(str(path), read_only=True)
    try:
        tables = con.execute(
            "SELECT table_name FROM information_schema.tables ORDER BY table_name"
        ).fetchall()
        metrics = [(r[0], r[1]) for r in con.execute("DESCRIBE metrics").fetchall()]
        loads = [(r[0], r[1]) for r in con.execute("DESCRIBE expert_load").fetchall()]
    finally:
        con.close()
    assert tables == [("expert_load",), ("metrics",)]
    assert metrics == [
        ("step", "BIGINT"),
        ("name", "VARCHAR"),
        ("value", "DOUBLE"),
        ("wall_time", "DOUBLE"),
    ]
    assert loads == [
        ("step", "BIGINT"),
        ("layer", "INTEGER"),
        ("expert", "INTEGER"),
        ("fraction", "DOUBLE"),
    ]


def test_rows_round_trip(tmp_path: Path) -> None:
    before = time.time()
    with MetricsWriter(tmp_path, 3) as w:
        for step in range(5):
            w.log(step, {"train/loss": 3.0 - step, "train/lr": 1e-3})
        w.log(5, {"train/loss": float("nan"), "train/grad_norm": float("inf")})
        w.log(2, {"train/loss": 42.0})  # a resumed run re-logs step 2: the latest value wins
    m = read_metrics(tmp_path, rank=3)
    assert sorted(m) == ["train/grad_norm", "train/loss", "train/lr"]
    loss = dict(m["train/loss"])
    assert [s for s, _ in m["train/loss"]] == [0, 1, 2, 3, 4, 5]
    assert loss[0] == 3.0 and loss[2] == 42.0 and math.isnan(loss[5])
    assert m["train/grad_norm"] == [(5, math.inf)]
    con = duckdb.connect(str(metrics_path(tmp_path, 3)), read_only=True)
    walls = [r[0] for r in con.execute("SELECT wall_time FROM metrics").fetchall()]
    nan_rows = con.execute("SELECT count(*) FROM metrics WHERE isnan(value)").fetchone()[0]
    con.close()
    assert all(before <= t <= time.time() for t in walls)
    assert nan_rows == 1  # stored as NaN, not NULL


def test_expert_load_round_trip(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, 0) as w:
        w.log_expert_load(10, 1, [0.25, 0.25, 0.5])
        w.log_expert_load(20, 1, np.array([0.1, 0.2, 0.7]))
        w.log_expert_load(20, 3, (0.5, 0.5))
    loads = read_expert_load(tmp_path)
    assert sorted(loads) == [1, 3]
    steps, grid = loads[1]
    assert steps.tolist() == [10, 20]
    np.testing.assert_allclose(grid, [[0.25, 0.25, 0.5], [0.1, 0.2, 0.7]])
    assert loads[3][0].tolist() == [20] and loads[3][1].shape == (1, 2)


def test_an_expert_load_logged_twice_reads_as_the_mean(tmp_path: Path) -> None:
    """A (step, layer, expert) logged again (a resumed run, or twice in one step) averages."""
    with MetricsWriter(tmp_path, 0) as w:
        w.log_expert_load(5, 0, [0.2, 0.8])
        w.flush()
        w.log_expert_load(5, 0, [0.6, 0.4])
        w.log_expert_load(6, 0, [0.5, 0.5])
    steps, grid = read_expert_load(tmp_path)[0]
    assert steps.tolist() == [5, 6]
    np.testing.assert_allclose(grid, [[0.4, 0.6], [0.5, 0.5]])


def test_buffers_until_flush(tmp_path: Path) -> None:
    w = MetricsWriter(tmp_path, 0, flush_every=1000)
    for step in range(10):
        w.log(step, {"a": float(step)})
    path = metrics_path(tmp_path, 0)
    assert not path.exists()  # nothing touched the database yet
    w.flush()
    assert _count(path) == 10
    # the file is closed between flushes: a reader can open it while the writer lives on
    assert len(read_metrics(tmp_path)["a"]) == 10
    w.log(10, {"a": 10.0})
    w.close()
    w.close()  # idempotent
    assert _count(path) == 11


def _wait_for_count(path: Path, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            try:
                if _count(path) == n:
                    return
            except duckdb.Error:
                pass  # the writer holds the file for a moment
        time.sleep(0.02)
    pytest.fail(f"automatic flush of {n} rows did not happen")


def test_hands_whole_steps_over_every_n_steps_in_background(tmp_path: Path) -> None:
    w = MetricsWriter(tmp_path, 0, flush_every=3, flush_seconds=3600)
    for step in range(4):
        w.log(step, {"a": 1.0})
        w.log(step, {"b": 2.0})  # a second call for the same step does not count again
    path = metrics_path(tmp_path, 0)
    _wait_for_count(path, 6)  # step 3's first row handed steps 0-2 over, both rows of each
    time.sleep(0.1)
    assert _count(path) == 6  # step 3 stays buffered
    w.close()
    assert _count(path) == 8


def test_flushes_after_flush_seconds_below_flush_every(tmp_path: Path) -> None:
    w = MetricsWriter(tmp_path, 0, flush_every=1000, flush_seconds=0.5)
    path = metrics_path(tmp_path, 0)
    w.log(0, {"a": 0.0})
    w.log(1, {"a": 1.0})
    w.end_step()  # not due yet: nothing is handed over
    assert not path.exists()
    time.sleep(0.6)
    w.end_step()  # due: steps 0 and 1 go to disk without waiting for step 2
    _wait_for_count(path, 2)
    w.log(2, {"a": 2.0})  # the clock restarted at the hand-over: buffered
    w.end_step()
    time.sleep(0.1)
    assert _count(path) == 2
    w.close()
    assert _count(path) == 3


def test_locked_file_is_retried(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with MetricsWriter(tmp_path, 0) as w:
        w.log(0, {"a": 0.0})
        w.flush()
        reader = duckdb.connect(str(metrics_path(tmp_path, 0)), read_only=True)
        with caplog.at_level(logging.WARNING, logger="braid.metrics.store"):
            w.log(1, {"a": 1.0})
            w.flush()  # the open reader blocks the write; training must not notice
        reader.close()
        assert any("will retry" in r.message for r in caplog.records)
        w.flush()  # nothing new, but the kept rows are written now
        assert _count(metrics_path(tmp_path, 0)) == 2


def test_a_reader_holding_the_file_briefly_delays_the_write_not_fails_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with MetricsWriter(tmp_path, 0) as w:
        w.log(0, {"a": 0.0})
        w.flush()
        # another process (a report, the dashboard) reads for 0.3 s
        code = (
            "import duckdb, sys, time; c = duckdb.connect(sys.argv[1], read_only=True); "
            "print('open', flush=True); time.sleep(0.3)"
        )
        path = str(metrics_path(tmp_path, 0))
        reader = subprocess.Popen([sys.executable, "-c", code, path], stdout=subprocess.PIPE)
        assert reader.stdout.readline().strip() == b"open"
        with caplog.at_level(logging.WARNING, logger="braid.metrics.store"):
            w.log(1, {"a": 1.0})
            w.flush()
        reader.wait(timeout=30)
        assert not caplog.records  # waited for the reader: no failed write
        assert _count(metrics_path(tmp_path, 0)) == 2


def test_killed_process_leaves_the_rows_of_its_last_seconds_readable(tmp_path: Path) -> None:
    # 50 steps 10 ms apart, flush_seconds=0.2, then a kill: no explicit flush, no close.
    script = textwrap.dedent(
        f"""
        import os, time
        from braid.metrics import MetricsWriter
        w = MetricsWriter({str(tmp_path)!r}, 0, flush_every=1000, flush_seconds=0.2)
        for step in range(50):
            w.log(step, {{"train/loss": 1.0}})
            time.sleep(0.01)
        time.sleep(0.3)  # the last hand-over reaches the disk; the steps after it never do
        os._exit(9)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == 9, proc.stderr.decode()
    steps = [s for s, _ in read_metrics(tmp_path)["train/loss"]]
    assert steps == list(range(len(steps)))  # whole steps, oldest first, no gaps
    assert 25 <= len(steps) < 50  # lost: at most the last 0.2 s (+ one step) of rows


def test_log_and_flush_cost(tmp_path: Path) -> None:
    """Not a timing assertion: exercises 1000 rows through log() and one flush, prints costs."""
    values = {
        "train/loss": 2.0,
        "train/lr": 1e-3,
        "train/grad_norm": 0.5,
        "train/tokens_per_s": 1e4,
    }
    w = MetricsWriter(tmp_path, 0, flush_every=10**9)
    t0 = time.perf_counter()
    for step in range(250):
        w.log(step, values)
    t1 = time.perf_counter()
    w.flush()
    t2 = time.perf_counter()
    w.close()
    print(
        f"log(): {(t1 - t0) / 250 * 1e6:.1f} us/call; flush of 1000 rows: {(t2 - t1) * 1e3:.1f} ms"
    )
    assert _count(metrics_path(tmp_path, 0)) == 1000


def test_user_errors(tmp_path: Path) -> None:
    with pytest.raises(BraidError, match="flush_every"):
        MetricsWriter(tmp_path, 0, flush_every=0)
    with pytest.raises(BraidError, match="flush_seconds=0"):
        MetricsWriter(tmp_path, 0, flush_seconds=0)
    with pytest.raises(BraidError, match="no metrics for rank 0"):
        read_metrics(tmp_path)
    with pytest.raises(BraidError, match="no metrics for rank 2"):
        read_expert_load(tmp_path, rank=2)


def test_tensorboard_needs_package(tmp_path: Path) -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(BraidError, match="pip install tensorboard"):
            MetricsWriter(tmp_path, 0, tensorboard=True)
        return
    with MetricsWriter(tmp_path, 0, tensorboard=True) as w:
        w.log(1, {"train/loss": 1.0})
    assert any((tmp_path / "tensorboard").iterdir())
