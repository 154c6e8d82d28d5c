"""The experiments registry: one SQLite row per run, shared by every run under a `run.dir` root.

Contract: `ExperimentsDB(root)` keeps `<root>/experiments.db`. Rank 0 calls `start()` once,
`heartbeat()` every log interval and `finish()` at the end; `braid runs` calls `list_runs()` and
prints `format_runs()`. The writers never raise on I/O trouble (a locked or unwritable database
warns once and training goes on); only a database from a newer braid raises BraidError.

Schema (version `SCHEMA_VERSION`, kept in the one-row table `schema_version(version)`):

    runs(id TEXT PRIMARY KEY, name, status, run_dir, config (JSON text), fingerprint,
         world_size, git_rev, host, pid, pid_start, start_time, end_time, heartbeat_time,
         step, last_loss, error, restarts)

Times are Unix seconds. `status` is running / finished / failed / killed. `start()` on an
existing id (a resume) sets it running again, keeps the first start_time and counts `restarts`.

Liveness: a "running" row is marked "killed" (and persisted, with end_time = its last heartbeat)
when looked at by `list_runs()`/`get_run()` if
  * it runs on this host and its pid is gone, is a zombie, or now belongs to another process
    (Linux: the process start time in /proc/<pid>/stat differs from the one recorded), or
  * it runs on another host and its last heartbeat is older than `stale_after_s`
    (default 30 minutes: well above any checkpoint or validation pause between heartbeats).

Concurrency: WAL journal and a 10 s busy timeout, so runs sharing a root do not fail on locks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from braid.errors import BraidError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DB_NAME = "experiments.db"
STATUSES = ("running", "finished", "failed", "killed")
END_STATUSES = ("finished", "failed", "killed")
STALE_AFTER_S = 30 * 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    run_dir TEXT,
    config TEXT,
    fingerprint TEXT,
    world_size INTEGER,
    git_rev TEXT,
    host TEXT,
    pid INTEGER,
    pid_start INTEGER,
    start_time REAL,
    end_time REAL,
    heartbeat_time REAL,
    step INTEGER,
    last_loss REAL,
    error TEXT,
    restarts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_by_start ON runs(start_time);
"""

_LIST_COLUMNS = (
    "id, name, status, step, last_loss, start_time, end_time, heartbeat_time, world_size, "
    "fingerprint, run_dir, git_rev, host, pid, pid_start, error, restarts"
)


class ExperimentsDB:
    """The runs registry at `<root>/experiments.db`; opened (and its schema made) on first use."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        stale_after_s: float = STALE_AFTER_S,
        read_only: bool = False,
    ):
        self.root = Path(root)
        self.read_only = read_only  # readers (`braid runs`) need no write access
        self.path = self.root / DB_NAME
        self.stale_after_s = float(stale_after_s)
        self._con: sqlite3.Connection | None = None
        self._con_pid = -1
        self._warned = False
        self._lock = threading.Lock()  # one connection, usable from any thread of the process

    # -- connection -------------------------------------------------------------------------

    def _connect(self, create: bool = True) -> sqlite3.Connection | None:
        if self._con is not None and self._con_pid == os.getpid():
            return self._con
        if not create and not self.path.exists():
            return None
        if self.read_only:
            # mode=ro: no schema, no journal change, no reaping writes; WAL readers still see
            # the writer's committed rows
            con = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro",
                uri=True,
                timeout=10.0,
                isolation_level=None,
                check_same_thread=False,
            )
            con.row_factory = sqlite3.Row
            self._con, self._con_pid = con, os.getpid()
            return con
        self.root.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(
            self.path, timeout=10.0, isolation_level=None, check_same_thread=False
        )
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA busy_timeout = 10000")
        try:  # WAL needs shared memory; on filesystems without it keep the rollback journal
            con.execute("PRAGMA journal_mode = WAL")
            con.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.OperationalError:
            pass
        with _transaction(con):
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    con.execute(stmt)
            row = con.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                con.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
        if row is not None and row[0] > SCHEMA_VERSION:
            con.close()
            raise BraidError(
                f"{self.path} has schema version {row[0]}, newer than this braid's "
                f"{SCHEMA_VERSION}: upgrade braid or use another run.dir"
            )
        self._con, self._con_pid = con, os.getpid()
        return con

    def close(self) -> None:
        if self._con is not None and self._con_pid == os.getpid():
            self._con.close()
        self._con = None

    def __enter__(self) -> ExperimentsDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, sql: str, params: tuple) -> None:
        """Run one statement; I/O trouble warns once instead of raising into training."""
        try:
            with self._lock:
                con = self._connect()
                assert con is not None
                con.execute(sql, params)
        except sqlite3.Error as e:
            if not self._warned:
                log.warning("experiments registry %s not updated: %s", self.path, e)
                self._warned = True

    # -- writers (rank 0 of a run) ------------------------------------------------------------

    def start(
        self,
        run_id: str,
        *,
        name: str,
        run_dir: str,
        config: dict,
        fingerprint: str,
        world_size: int,
        git_rev: str | None,
    ) -> None:
        """Record the run as running on this host and pid (a resume of a known id restarts it)."""
        now = time.time()
        pid = os.getpid()
        self._write(
            """INSERT INTO runs (id, name, status, run_dir, config, fingerprint, world_size,
                   git_rev, host, pid, pid_start, start_time, heartbeat_time, step)
               VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)
               ON CONFLICT(id) DO UPDATE SET
                   name = excluded.name, status = 'running', run_dir = excluded.run_dir,
                   config = excluded.config, fingerprint = excluded.fingerprint,
                   world_size = excluded.world_size, git_rev = excluded.git_rev,
                   host = excluded.host, pid = excluded.pid, pid_start = excluded.pid_start,
                   heartbeat_time = excluded.heartbeat_time, end_time = NULL, error = NULL,
                   restarts = runs.restarts + 1""",
            (
                run_id,
                name,
                str(run_dir),
                json.dumps(config, sort_keys=True, default=str),
                fingerprint,
                int(world_size),
                git_rev,
                socket.gethostname(),
                pid,
                _pid_start(pid),
                now,
                now,
            ),
        )

    def heartbeat(self, run_id: str, *, step: int, last_loss: float | None) -> None:
        """Note progress: one UPDATE (tens of microseconds with WAL)."""
        self._write(
            "UPDATE runs SET step = ?, last_loss = ?, heartbeat_time = ? WHERE id = ?",
            (int(step), _float_or_none(last_loss), time.time(), run_id),
        )

    def finish(
        self,
        run_id: str,
        status: str,
        *,
        step: int | None = None,
        last_loss: float | None = None,
        error: str | None = None,
    ) -> None:
        """Close the run with status finished / failed / killed; step and loss if given."""
        if status not in END_STATUSES:
            raise ValueError(f"finish status {status!r}: expected one of {', '.join(END_STATUSES)}")
        now = time.time()
        self._write(
            """UPDATE runs SET status = ?, end_time = ?, heartbeat_time = ?, error = ?,
                   step = COALESCE(?, step), last_loss = COALESCE(?, last_loss)
               WHERE id = ?""",
            (
                status,
                now,
                now,
                error,
                None if step is None else int(step),
                _float_or_none(last_loss),
                run_id,
            ),
        )

    # -- readers ------------------------------------------------------------------------------

    def list_runs(self) -> list[dict[str, Any]]:
        """Every run, oldest first; dead "running" rows are marked killed first."""
        with self._lock, self._reading():
            con = self._connect(create=False)
            if con is None:
                return []
            sql = f"SELECT {_LIST_COLUMNS} FROM runs ORDER BY start_time"
            return [self._reap(con, dict(r)) for r in con.execute(sql).fetchall()]

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        """One run with its config (a dict), or None if the id is unknown."""
        with self._lock, self._reading():
            con = self._connect(create=False)
            if con is None:
                return None
            sql = f"SELECT {_LIST_COLUMNS}, config FROM runs WHERE id = ?"
            found = con.execute(sql, (run_id,)).fetchone()
            if found is None:
                return None
            run = dict(found)
            run["config"] = json.loads(run["config"]) if run["config"] else {}
            return self._reap(con, run)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """Readers serve `braid runs`: a broken database is the user's to fix, say so."""
        try:
            yield
        except sqlite3.Error as e:
            raise BraidError(
                f"cannot read {self.path}: {e}: fix its permissions or move it aside"
            ) from None

    def _reap(self, con: sqlite3.Connection, run: dict[str, Any]) -> dict[str, Any]:
        if run["status"] != "running":
            return run
        reason = self._dead_reason(run)
        if reason is None:
            return run
        end = run["heartbeat_time"] or run["start_time"]
        if self.read_only:  # shown as killed; the row is fixed by the next writer that reads it
            run.update(status="killed", end_time=end, error=reason)
            return run
        cur = con.execute(
            "UPDATE runs SET status = 'killed', end_time = ?, error = ? "
            "WHERE id = ? AND status = 'running' AND pid IS ? AND host IS ?",
            (end, reason, run["id"], run["pid"], run["host"]),
        )
        if cur.rowcount:
            run.update(status="killed", end_time=end, error=reason)
        return run

    def _dead_reason(self, run: dict[str, Any]) -> str | None:
        pid, host = run["pid"], run["host"]
        if host == socket.gethostname() and pid is not None:
            if not pid_alive(int(pid), run["pid_start"]):
                return f"process {pid} on {host} is gone"
            return None
        beat = run["heartbeat_time"] or run["start_time"] or 0.0
        if time.time() - beat > self.stale_after_s:
            return f"no heartbeat from {host} for over {self.stale_after_s:.0f} s"
        return None


def pid_alive(pid: int, start_ticks: int | None = None) -> bool:
    """True if `pid` is a live (non-zombie) process on this host and, when `start_ticks` is
    given and /proc is readable, the same process that was recorded (not a reused pid)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except OSError:
        return False
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, ticks = stat
    if state in ("Z", "X"):
        return False
    return start_ticks is None or ticks == start_ticks


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) from /proc/<pid>/stat, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # the name in (...) may contain spaces
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _pid_start(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


def _float_or_none(x: float | None) -> float | None:
    return None if x is None else float(x)


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error) on an autocommit connection."""

    def __init__(self, con: sqlite3.Connection):
        self.con = con

    def __enter__(self) -> None:
        self.con.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.con.execute("ROLLBACK" if exc_type else "COMMIT")


def git_revision(path: str | os.PathLike[str]) -> str | None:
    """The commit hash checked out at `path` (suffixed "-dirty" if it has local changes), or None
    if `path` is not in a git work tree or git is missing."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = rev.stdout.strip()
    if not sha:
        return None
    return sha + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
