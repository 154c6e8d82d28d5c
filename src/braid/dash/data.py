"""What the dashboard serves: the run list, config diffs and one run's plot data, read from a run
root without ever getting in a training run's way.

Contract: `DashData(root)` answers `runs()`, `diff(a, b)` and `run_data(run_id, rank)` with
JSON-ready dicts (NaN and inf become None). Run ids come from the registry and from requests, so
both are distrusted: `run_dir()` accepts only a registered id that names a directory strictly
inside the root after resolving symlinks (no absolute path, no `.` or `..` component), and the
metrics file must resolve inside it too; anything else raises `UnsafeRun`.

Reading while a run writes: every request opens `experiments.db` and the DuckDB file anew and
closes them before answering (no connection outlives a request). A metrics file is re-read only
when its size or mtime changed and at most once per `MIN_READ_INTERVAL_S`, however many pages
poll, and then only the rows newer than what was read before (by wall_time for metrics, by step
for expert load). A first read, or one after a resume logged earlier steps again, copies the
file under the lock and queries the copy, so the lock is held for a copy at disk speed, not for
the queries of a large file; incremental reads query the file itself (milliseconds). The
DuckDB writer needs the file to itself for its batch writes, so the reader waits at most
`LOCK_WAIT_S` for it and otherwise answers with the last data it read, marked stale. The writer
waits for a read in progress in its own thread (store.WRITE_LOCK_WAIT_S): a training step never
waits on the dashboard; a flush that training waits for (a checkpoint, the end) waits at most
for one read in progress.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import duckdb
import numpy as np

from braid.errors import BraidError, first_line
from braid.metrics import names, queries
from braid.metrics.experiments import DB_NAME, ExperimentsDB
from braid.metrics.store import metrics_path

LOCK_WAIT_S = 0.3
MIN_READ_INTERVAL_S = 1.0  # per file, however many pages poll: bounds the time we hold its lock
MAX_POINTS = 5000  # per line sent to the browser; longer series are thinned evenly
MAX_HEATMAP_COLUMNS = 400
_SMOOTHED = {names.TRAIN_LOSS} | {p.metric for p in names.SERIES_PANELS if p.smooth}
_RUN_FIELDS = (
    "id",
    "name",
    "status",
    "step",
    "last_loss",
    "start_time",
    "end_time",
    "heartbeat_time",
    "world_size",
    "error",
    "restarts",
)


class UnsafeRun(BraidError):
    """A run id or path that would leave the run root."""


class UnknownRun(BraidError):
    """A run id the registry does not know."""


def layout() -> dict[str, Any]:
    """The panels the page draws, from names.py (the page hard-codes no metric name)."""
    return {
        "loss": {"train": names.TRAIN_LOSS, "val": names.VAL_LOSS},
        "panels": [
            {
                "key": p.key,
                "metric": p.metric,
                "title": p.title,
                "log_y": p.log_y,
                "smooth": p.smooth,
            }
            for p in names.SERIES_PANELS
        ],
        "fp8_prefix": names.FP8_PREFIX,
    }


@dataclass
class _Snapshot:
    """What was read of one metrics file so far."""

    stamp: tuple[int, int] | None = None  # (size, mtime_ns) of the file when last read
    # name -> (steps, values, walls) sorted by step, one row per step
    series: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    max_wall: float | None = None
    max_step: int | None = None
    loads: queries.Loads = field(default_factory=dict)
    load_step: int | None = None
    read_at: float | None = None
    body: dict[str, Any] | None = None  # the answer's data part for this read


class DashData:
    """Reads for the dashboard's endpoints; safe to share between request threads."""

    def __init__(self, root: str | Path, *, min_read_interval_s: float = MIN_READ_INTERVAL_S):
        self.root = Path(root).resolve()
        self.min_read_interval_s = min_read_interval_s
        self._lock = threading.Lock()
        self._cache: dict[Path, _Snapshot] = {}

    # -- registry ---------------------------------------------------------------------------

    def _registry(self) -> list[dict[str, Any]]:
        if not (self.root / DB_NAME).is_file():
            return []
        db = ExperimentsDB(self.root, read_only=True)  # the dashboard writes nothing
        try:
            return db.list_runs()
        finally:
            db.close()

    def runs(self) -> list[dict[str, Any]]:
        """Every registered run, newest first, with the fields the run table shows."""
        rows = [{k: _json_value(r.get(k)) for k in _RUN_FIELDS} for r in self._registry()]
        return rows[::-1]

    def _registered(self, run_id: str) -> dict[str, Any]:
        _check_relative(run_id)
        db = ExperimentsDB(self.root, read_only=True)  # the dashboard writes nothing
        try:
            run = db.get_run(run_id)  # None without a database: it is not created here
        finally:
            db.close()
        if run is None:
            raise UnknownRun(f"run {run_id!r} is not in {self.root / DB_NAME}")
        return run

    def run_dir(self, run_id: str) -> Path:
        """`<root>/<run_id>` resolved, if `run_id` is registered and stays inside the root."""
        self._registered(run_id)
        return _inside(self.root, self.root / run_id, f"run {run_id!r}")

    def diff(self, a: str, b: str) -> list[dict[str, Any]]:
        """[{key, a, b}] for every config key whose value differs between runs a and b."""
        ca = _flatten(self._registered(a).get("config") or {})
        cb = _flatten(self._registered(b).get("config") or {})
        missing = object()
        out = []
        for key in sorted(set(ca) | set(cb)):
            va, vb = ca.get(key, missing), cb.get(key, missing)
            if va != vb:
                out.append(
                    {
                        "key": key,
                        "a": None if va is missing else _json_value(va),
                        "b": None if vb is missing else _json_value(vb),
                    }
                )
        return out

    # -- metrics ----------------------------------------------------------------------------

    def run_data(self, run_id: str, rank: int = 0, have: float | None = None) -> dict[str, Any]:
        """One rank's plot data: series, expert load heatmaps, the overlap table. A caller that
        holds the answer read at `have` (its `read_at`) gets `{"unchanged": true, ...}` without
        the data while nothing newer was read."""
        world = self._registered(run_id).get("world_size") or 1
        if not 0 <= rank < world:
            raise BraidError(f"rank={rank} for run {run_id!r}: expected 0..{world - 1}")
        run_dir = _inside(self.root, self.root / run_id, f"run {run_id!r}")
        path = _inside(run_dir, metrics_path(run_dir, rank), f"metrics of run {run_id!r}")
        with self._lock:
            snap = self._cache.setdefault(path, _Snapshot())
            stale, note = _refresh(path, snap, self.min_read_interval_s)
            head = {"run": run_id, "rank": rank, "stale": stale, "note": note,
                    "read_at": snap.read_at, "last_step": snap.max_step}  # fmt: skip
            if have is not None and have == snap.read_at:
                return {**head, "unchanged": True}
            if snap.body is None:  # built once per read, shared by every page that asks
                snap.body = _body(snap)
            return {**head, "unchanged": False, **snap.body}


def _refresh(path: Path, snap: _Snapshot, min_interval_s: float) -> tuple[bool, str | None]:
    """Read what is new in `path` into `snap`; (stale, note) says how fresh the result is."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False, "no metrics yet (the first flush comes after metrics.flush_seconds)"
    stamp = (st.st_size, st.st_mtime_ns)  # taken before reading, so a write after it re-reads
    if stamp == snap.stamp or (snap.read_at and time.time() - snap.read_at < min_interval_s):
        return False, None
    fresh = snap.read_at is None
    try:
        if not fresh:
            con = queries.open_read(path, LOCK_WAIT_S)
            try:
                cols = queries.query_metrics(con, since_wall=snap.max_wall)
                newer = cols["wall"] > (-math.inf if snap.max_wall is None else snap.max_wall)
                # a resumed run logs earlier steps again: read everything afresh
                fresh = snap.max_step is not None and bool(
                    (cols["step"][newer] <= snap.max_step).any()
                )
                if not fresh:
                    load_cols = queries.query_expert_load(con, after_step=snap.load_step)
            finally:
                con.close()
        if fresh:
            cols, load_cols = _read_copy(path)
    except duckdb.PermissionException as e:  # a view reading outside the file: refused
        return True, f"metrics file refused: {first_line(e)}"
    except duckdb.Error:
        when = time.strftime("%H:%M:%S", time.localtime(snap.read_at)) if snap.read_at else "-"
        return True, f"metrics file busy (being written); showing data read at {when}"
    if fresh:
        snap.series, snap.max_wall, snap.max_step, snap.loads = {}, None, None, {}
    _merge_metrics(snap, cols)
    new_loads = queries.loads_from_columns(load_cols)
    snap.loads = new_loads if fresh else _append_loads(snap.loads, new_loads)
    steps = [int(s[-1]) for s, _ in snap.loads.values() if len(s)]
    snap.load_step = max(steps) if steps else None
    snap.stamp, snap.read_at, snap.body = stamp, time.time(), None
    return False, None


def _read_copy(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every row of `path` (metrics, expert load), queried from a private copy: the writer's
    lock is held while the file is copied (disk speed), not while a large file is queried."""
    with tempfile.TemporaryDirectory(prefix="braid-dash-") as tmp:
        copy = Path(tmp) / path.name
        con = queries.open_read(path, LOCK_WAIT_S)  # a shared lock: no writer while copying
        try:
            shutil.copyfile(path, copy)
            wal = path.with_name(path.name + ".wal")  # left by a killed writer, if any
            if wal.exists():
                shutil.copyfile(wal, copy.with_name(copy.name + ".wal"))
        finally:
            con.close()
        con = queries.connect(copy, read_only=True)
        try:
            return queries.query_metrics(con), queries.query_expert_load(con)
        finally:
            con.close()


def _merge_metrics(snap: _Snapshot, cols: dict[str, np.ndarray]) -> None:
    """Fold new (name, step, value, wall) rows in: per step the row with the latest wall wins."""
    if not len(cols["step"]):
        return
    for name in np.unique(cols["name"]):
        sel = cols["name"] == name
        s, v, w = cols["step"][sel], cols["value"][sel], cols["wall"][sel]
        if name in snap.series:
            s0, v0, w0 = snap.series[name]
            s, v, w = np.concatenate([s0, s]), np.concatenate([v0, v]), np.concatenate([w0, w])
        order = np.lexsort((w, s))  # by step, then wall: the last of each step is the latest
        s, v, w = s[order], v[order], w[order]
        last = np.r_[s[1:] != s[:-1], True]
        snap.series[str(name)] = (s[last], v[last], w[last])
    snap.max_wall = float(np.nanmax(cols["wall"]))
    top = int(cols["step"].max())
    snap.max_step = top if snap.max_step is None else max(snap.max_step, top)


def _append_loads(old: queries.Loads, new: queries.Loads) -> queries.Loads:
    out = dict(old)
    for layer, (steps, grid) in new.items():
        if layer not in out:
            out[layer] = (steps, grid)
            continue
        s0, g0 = out[layer]
        width = max(g0.shape[1], grid.shape[1])
        out[layer] = (
            np.concatenate([s0, steps]),
            np.concatenate([_pad(g0, width), _pad(grid, width)]),
        )
    return out


def _pad(grid: np.ndarray, width: int) -> np.ndarray:
    return np.pad(grid, ((0, 0), (0, width - grid.shape[1])), constant_values=np.nan)


def _body(snap: _Snapshot) -> dict[str, Any]:
    series = {}
    overlap_series = {}
    for name, (s, v, _) in snap.series.items():
        if names.overlap_parts(name) is not None:
            overlap_series[name] = list(zip(s.tolist(), v.tolist(), strict=True))
            continue
        entry = {"x": _thin(s), "y": _thin(v)}
        if name in _SMOOTHED:
            entry["smooth"] = _thin(queries.smooth(v))
        series[name] = entry
    load = []
    for layer, (steps, grid) in sorted(snap.loads.items()):
        xs, g = queries.bin_columns(steps, grid, MAX_HEATMAP_COLUMNS)
        load.append(
            {
                "layer": layer,
                "x": _json_list(xs),
                "z": [_json_list(row) for row in g.T],  # experts x step columns
                "imbalance": {"x": _thin(steps), "y": _thin(queries.imbalance(grid))},
            }
        )
    overlap = [
        {"layer": layer, **{k: _json_value(v) for k, v in d.items()}}
        for layer, d in queries.overlap_by_layer(overlap_series).items()
    ]
    return {
        "series": series,
        "load": load,
        "overlap": overlap,
    }


def _thin(a: np.ndarray) -> list:
    """At most MAX_POINTS evenly spaced entries (always the last one), JSON-safe."""
    if len(a) > MAX_POINTS:
        idx = np.unique(np.r_[np.linspace(0, len(a) - 1, MAX_POINTS).astype(int), len(a) - 1])
        a = a[idx]
    return _json_list(a)


def _json_list(a: np.ndarray) -> list:
    a = np.asarray(a)
    if a.dtype.kind in "iub":
        return a.tolist()
    return [x if math.isfinite(x) else None for x in a.astype(np.float64).tolist()]


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple, dict)):
        return str(v) if isinstance(v, dict) else [_json_value(x) for x in v]
    return v


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_relative(run_id: str) -> None:
    """Refuse ids that are absolute or step outside: only plain names joined by '/'."""
    parts = PurePosixPath(run_id).parts
    if (
        not run_id
        or "\\" in run_id
        or "\0" in run_id
        or PurePosixPath(run_id).is_absolute()
        or any(p in ("", ".", "..") for p in run_id.split("/"))
        or not parts
    ):
        raise UnsafeRun(f"run id {run_id!r} is not a plain name inside the run root")


def _inside(root: Path, path: Path, what: str) -> Path:
    """`path` resolved (symlinks followed), if it lies strictly inside `root` (resolved)."""
    resolved = path.resolve()
    if resolved == root or not resolved.is_relative_to(root):
        raise UnsafeRun(f"{what} resolves to {resolved}, outside {root}")
    return resolved
