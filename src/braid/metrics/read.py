"""Readers of the per-rank metrics files that `store.MetricsWriter` writes (the SQL lives in
`queries.py`, shared with the dashboard).

`read_metrics()` / `read_expert_load()` open the file read-only (retrying while a writer holds
its lock for up to `READ_RETRY_S`) and raise BraidError when the run has no metrics file for
that rank.
"""

from __future__ import annotations

from collections.abc import Callable
from os import PathLike
from typing import Any

import duckdb
import numpy as np

from braid.errors import BraidError, first_line
from braid.metrics import queries
from braid.metrics.store import metrics_path

READ_RETRY_S = 10.0


def _open_read(run_dir: str | PathLike[str], rank: int) -> Any:
    path = metrics_path(run_dir, rank)
    if not path.is_file():
        raise BraidError(
            f"no metrics for rank {rank} in {run_dir} ({path} is missing): "
            "check the run directory, or wait for the run's first flush"
        )
    try:
        return queries.open_read(path, READ_RETRY_S)
    except duckdb.Error as e:
        raise BraidError(f"cannot read {path}: {e}") from None


def read_metrics(run_dir: str | PathLike[str], rank: int = 0) -> dict[str, list[tuple[int, float]]]:
    """name -> [(step, value), ...] sorted by step; a step logged twice (a resumed run) keeps
    its latest value. NaN stays NaN."""
    return queries.metrics_from_columns(_query(run_dir, rank, queries.query_metrics))


def read_expert_load(
    run_dir: str | PathLike[str], rank: int = 0
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """layer -> (steps [S] int64, fractions [S, E] float64, NaN where a value is missing);
    a (step, layer, expert) logged twice is averaged."""
    return queries.loads_from_columns(_query(run_dir, rank, queries.query_expert_load))


def _query(run_dir: str | PathLike[str], rank: int, query: Callable[[Any], Any]) -> Any:
    """`query(con)` on the rank's metrics file, opened read-only and closed again."""
    con = _open_read(run_dir, rank)
    try:
        return query(con)
    except duckdb.Error as e:  # e.g. a view that reads outside the file (queries.SAFE_CONFIG)
        raise BraidError(f"cannot read {metrics_path(run_dir, rank)}: {first_line(e)}") from None
    finally:
        con.close()
