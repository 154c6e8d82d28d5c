"""Per-rank metrics in DuckDB: the buffered writer of the training loop (readers: `read.py`).

Contract: `MetricsWriter(run_dir, rank)` writes `<run_dir>/metrics/rank_<rank>.duckdb` with

    metrics(step BIGINT, name VARCHAR, value DOUBLE, wall_time DOUBLE)
    expert_load(step BIGINT, layer INTEGER, expert INTEGER, fraction DOUBLE)

and no other tables. `wall_time` is Unix seconds at the `log()` call; NaN and inf values are kept
as such. `expert_load` holds one row per (step, MoE layer, expert): that expert's share of the
layer's routed tokens, as the caller measured it.

Cost: `log()` and `log_expert_load()` only append to Python lists (a few microseconds). The
buffered rows are handed to a background thread as soon as `flush_every` distinct steps are
buffered or `flush_seconds` have passed since the last hand-over, whichever comes first. The
check runs when a new step's first row arrives (so a batch holds whole steps) and at
`end_step()`, which a caller that has logged everything of a step may call to hand it over
without waiting for the next step. The thread opens the DuckDB file, bulk-inserts the rows from
numpy columns in one transaction and closes the file again (about 20 ms of its time per batch:
with the 5 s default, well under 1% of a core), so readers (a report, `duckdb` on the command
line) can open it while training runs and a killed process leaves a readable file, losing at
most the last `flush_seconds` or `flush_every` steps. `flush()` waits until everything logged
so far is on disk; `close()` also stops the thread (it runs at exit too). Writing never raises
into training: a reader holding the file lock (a report, `braid dash`: tens to hundreds of
milliseconds) is waited for up to `WRITE_LOCK_WAIT_S` in the thread; a write that still fails
(disk full, a reader that keeps the file open) warns once and is retried with the next flush.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from braid.errors import BraidError, first_line
from braid.metrics import queries

log = logging.getLogger(__name__)

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS metrics "
    "(step BIGINT, name VARCHAR, value DOUBLE, wall_time DOUBLE)",
    "CREATE TABLE IF NOT EXISTS expert_load "
    "(step BIGINT, layer INTEGER, expert INTEGER, fraction DOUBLE)",
)
MAX_PENDING_ROWS = 2_000_000  # rows kept for retry while writes fail; older ones are dropped
CLOSE_RETRY_S = 5.0
WRITE_LOCK_WAIT_S = 5.0


def metrics_path(run_dir: str | PathLike[str], rank: int = 0) -> Path:
    """`<run_dir>/metrics/rank_<rank>.duckdb`."""
    return Path(run_dir) / "metrics" / f"rank_{int(rank)}.duckdb"


class MetricsWriter:
    """Buffered per-rank metrics writer; see the module docstring for the contract."""

    def __init__(
        self,
        run_dir: str | PathLike[str],
        rank: int = 0,
        *,
        flush_every: int = 50,
        flush_seconds: float = 5.0,
        tensorboard: bool = False,
    ):
        if int(flush_every) <= 0:
            raise BraidError(f"metrics flush_every={flush_every!r}: must be > 0")
        if not float(flush_seconds) > 0:
            raise BraidError(f"metrics flush_seconds={flush_seconds!r}: must be > 0")
        self.run_dir = Path(run_dir)
        self.rank = int(rank)
        self.path = metrics_path(run_dir, rank)
        self.flush_every = int(flush_every)
        self.flush_seconds = float(flush_seconds)
        tb = _summary_writer(self.run_dir / "tensorboard") if tensorboard else None
        self._sink = _Sink(self.path, tb)
        self._rows = self._sink.rows
        self._loads = self._sink.loads
        self._last_step: int | None = None
        self._steps = 0  # distinct steps buffered since the last hand-over
        self._due = time.monotonic() + self.flush_seconds
        self._finalizer = weakref.finalize(self, self._sink.close)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Buffer `values` (name -> number, e.g. {"train/loss": 2.1}) for `step`."""
        step = int(step)
        if step != self._last_step:
            self._new_step(step)
        self._rows.append((step, time.time(), {k: float(v) for k, v in values.items()}))

    def log_expert_load(self, step: int, layer: int, fractions: Sequence[float] | Any) -> None:
        """Buffer one MoE layer's per-expert token shares (a sequence, array or tensor)."""
        if hasattr(fractions, "detach"):  # a torch tensor: copy to host as float64
            arr = fractions.detach().cpu().double().numpy().reshape(-1)
        else:
            arr = np.asarray(fractions, dtype=np.float64).reshape(-1)
        step = int(step)
        if step != self._last_step:
            self._new_step(step)
        self._loads.append((step, int(layer), arr.copy()))

    def end_step(self) -> None:
        """Everything of the current step is logged: hand the buffer over now if a flush is due,
        rather than when the next step's first row arrives."""
        if self._steps >= self.flush_every or time.monotonic() >= self._due:
            self._hand_over()

    def _new_step(self, step: int) -> None:
        # Checked before the new step's first row is buffered, so a batch holds whole steps.
        self.end_step()
        self._last_step = step
        self._steps += 1

    def _hand_over(self) -> None:
        self._steps = 0
        self._due = time.monotonic() + self.flush_seconds
        self._sink.submit(wait=False)

    @property
    def error(self) -> str | None:
        """Why writing failed (the first failure), or None while every write succeeded."""
        return self._sink.error

    def probe(self) -> None:
        """Open the file and make its tables now, in this thread: a file that cannot be written
        (corrupt, read-only, a full disk) is a one-line BraidError before training starts."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            con = _connect_for_write(self.path)
            try:
                for stmt in SCHEMA:
                    con.execute(stmt)
            finally:
                con.close()
        except (duckdb.Error, OSError) as e:  # a corrupt file, permissions, a full disk
            raise BraidError(
                f"metrics store {self.path} cannot be written ({type(e).__name__}: "
                f"{first_line(e)}): move it aside or fix its permissions, or set "
                "metrics.on_error=continue to train without it"
            ) from None

    def flush(self) -> None:
        """Write everything buffered so far and wait until it is on disk."""
        self._steps = 0
        self._due = time.monotonic() + self.flush_seconds
        self._sink.submit(wait=True)

    def close(self) -> None:
        """Flush, stop the background thread and close TensorBoard; safe to call twice.
        Logging after close still works (the thread restarts at the next flush)."""
        self._sink.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def require_tensorboard() -> type:
    """TensorBoard's SummaryWriter class; BraidError with the install line when it is missing.
    The trainer calls this before it writes anything, so a missing package leaves no run."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise BraidError(
            "metrics.tensorboard=true needs the tensorboard package: pip install tensorboard "
            "(or set metrics.tensorboard=false)"
        ) from None
    return SummaryWriter


def _summary_writer(logdir: Path) -> Any:
    return require_tensorboard()(log_dir=str(logdir))


class _Sink:
    """Owns the buffers and the writer thread, so the writer can be closed at exit by a
    finalizer that holds no reference to the MetricsWriter itself."""

    def __init__(self, path: Path, tb: Any):
        self.path = path
        self.tb = tb
        self.rows: list[tuple[int, float, dict[str, float]]] = []
        self.loads: list[tuple[int, int, np.ndarray]] = []
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._pending_rows: list[tuple[int, float, dict[str, float]]] = []
        self._pending_loads: list[tuple[int, int, np.ndarray]] = []
        self._warned: set[str] = set()
        self._pid = os.getpid()
        self.error: str | None = None  # the first failed write, for the trainer to act on

    # main thread

    def submit(self, wait: bool) -> None:
        # a waiting flush with nothing new still goes through the thread, to retry failed rows
        if self.rows or self.loads or (wait and self._thread is not None):
            batch = (self.rows[:], self.loads[:])
            self.rows.clear()
            self.loads.clear()
            if self._thread is None or not self._thread.is_alive():
                name = f"braid-metrics-{self.path.stem}"
                self._thread = threading.Thread(target=self._run, name=name, daemon=True)
                self._thread.start()
            self._queue.put(batch)
        if wait and self._thread is not None:
            self._queue.join()

    def close(self) -> None:
        if os.getpid() != self._pid:  # a forked child (e.g. a data worker) owns nothing here
            return
        self.submit(wait=True)
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=CLOSE_RETRY_S + 30.0)
            self._thread = None
        if self.tb is not None:
            tb, self.tb = self.tb, None
            try:
                tb.close()
            except Exception as e:  # never raise into training
                log.warning("closing TensorBoard writer failed: %s", e)

    # writer thread

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    deadline = time.monotonic() + CLOSE_RETRY_S
                    while self._pending_rows or self._pending_loads:
                        if self._write_pending() or time.monotonic() > deadline:
                            break
                        time.sleep(0.1)
                    return
                rows, loads = item
                self._to_tensorboard(rows)
                self._pending_rows.extend(rows)
                self._pending_loads.extend(loads)
                self._write_pending()
            except Exception as e:  # the thread must survive anything
                self._warn("error", f"metrics writer error: {e!r}")
            finally:
                self._queue.task_done()

    def _write_pending(self) -> bool:
        if not self._pending_rows and not self._pending_loads:
            return True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            con = _connect_for_write(self.path)
            try:
                con.execute("BEGIN TRANSACTION")
                for stmt in SCHEMA:
                    con.execute(stmt)
                if self._pending_rows:
                    _insert_metrics(con, self._pending_rows)
                if self._pending_loads:
                    _insert_loads(con, self._pending_loads)
                con.execute("COMMIT")
            finally:
                con.close()
        except Exception as e:  # duckdb.Error, OSError, or a bad value: keep rows, go on
            if not _lock_conflict(e):  # a reader holding the file longer is retried, not fatal
                self.error = self.error or f"{type(e).__name__}: {first_line(e)}"
            self._warn("write", f"metrics not written to {self.path} yet (will retry): {e}")
            self._trim_pending()
            return False
        self._pending_rows.clear()
        self._pending_loads.clear()
        return True

    def _trim_pending(self) -> None:
        n = sum(len(r[2]) for r in self._pending_rows)
        n += sum(len(x[2]) for x in self._pending_loads)
        if n > MAX_PENDING_ROWS:
            self._warn("drop", f"dropping {n} unwritten metric rows for {self.path}")
            self._pending_rows.clear()
            self._pending_loads.clear()

    def _to_tensorboard(self, rows: list[tuple[int, float, dict[str, float]]]) -> None:
        if self.tb is None:
            return
        try:
            for step, wall, values in rows:
                for name, value in values.items():
                    self.tb.add_scalar(name, value, global_step=step, walltime=wall)
        except Exception as e:
            self._warn("tensorboard", f"TensorBoard write failed: {e}")

    def _warn(self, kind: str, msg: str) -> None:
        """Log each kind of trouble once per writer, so a flaky disk cannot flood the log."""
        if kind not in self._warned:
            log.warning(msg)
            self._warned.add(kind)


def _lock_conflict(e: BaseException) -> bool:
    """A reader holds the file's lock (DuckDB: "Could not set lock on file")."""
    return isinstance(e, duckdb.IOException) and "lock" in str(e)


def _connect_for_write(path: Path) -> Any:
    """Open `path` for writing, waiting up to WRITE_LOCK_WAIT_S while a reader holds its lock."""
    deadline = time.monotonic() + WRITE_LOCK_WAIT_S
    while True:
        try:
            return queries.connect(path, read_only=False)
        except duckdb.IOException as e:  # "Could not set lock on file": a reader has it open
            if not _lock_conflict(e) or time.monotonic() > deadline:
                raise  # another I/O error (a full disk) fails at once
            time.sleep(0.01)


def _insert_metrics(con: Any, rows: list[tuple[int, float, dict[str, float]]]) -> None:
    steps: list[int] = []
    walls: list[float] = []
    names: list[str] = []
    values: list[float] = []
    for step, wall, vals in rows:
        n = len(vals)
        steps += [step] * n
        walls += [wall] * n
        names += vals.keys()
        values += vals.values()
    if not steps:
        return
    value = np.array(values, dtype=np.float64)
    cols = {
        "step": np.array(steps, dtype=np.int64),
        "name": np.array(names, dtype=object),
        "value": value,
        "is_nan": np.isnan(value),  # numpy NaN scans as NULL; keep it a NaN
        "wall_time": np.array(walls, dtype=np.float64),
    }
    con.register("_braid_rows", cols)
    try:
        con.execute(
            "INSERT INTO metrics SELECT step, name, "
            "CASE WHEN is_nan THEN 'nan'::DOUBLE ELSE value END, wall_time FROM _braid_rows"
        )
    finally:
        con.unregister("_braid_rows")


def _insert_loads(con: Any, loads: list[tuple[int, int, np.ndarray]]) -> None:
    sizes = np.array([len(f) for _, _, f in loads], dtype=np.int64)
    if not sizes.sum():
        return
    fraction = np.concatenate([f for _, _, f in loads])
    cols = {
        "step": np.repeat(np.array([s for s, _, _ in loads], dtype=np.int64), sizes),
        "layer": np.repeat(np.array([la for _, la, _ in loads], dtype=np.int32), sizes),
        "expert": np.concatenate([np.arange(n, dtype=np.int32) for n in sizes]),
        "fraction": fraction,
        "is_nan": np.isnan(fraction),
    }
    con.register("_braid_loads", cols)
    try:
        con.execute(
            "INSERT INTO expert_load SELECT step, layer, expert, "
            "CASE WHEN is_nan THEN 'nan'::DOUBLE ELSE fraction END FROM _braid_loads"
        )
    finally:
        con.unregister("_braid_loads")
