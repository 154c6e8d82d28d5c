"""ExperimentsDB: lifecycle, dead-run detection (persisted), concurrency, format_runs."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from braid.errors import BraidError
from braid.metrics import ExperimentsDB, format_runs, git_revision
from braid.metrics.experiments import SCHEMA_VERSION, pid_alive


def _start(db: ExperimentsDB, run_id: str, **kw: object) -> None:
    args = dict(
        name=f"name-{run_id}",
        run_dir=f"/runs/{run_id}",
        config={"train": {"lr": 0.1}},
        fingerprint="abc123",
        world_size=2,
        git_rev=None,
    )
    args.update(kw)
    db.start(run_id, **args)  # type: ignore[arg-type]


def _raw_status(root: Path, run_id: str) -> str:
    con = sqlite3.connect(root / "experiments.db")
    try:
        return con.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()[0]
    finally:
        con.close()


def test_lifecycle_and_statuses(tmp_path: Path) -> None:
    with ExperimentsDB(tmp_path) as db:
        _start(db, "r1")
        _start(db, "r2")
        _start(db, "r3")
        db.heartbeat("r1", step=40, last_loss=2.5)
        [r1] = [r for r in db.list_runs() if r["id"] == "r1"]
        assert r1["status"] == "running" and r1["step"] == 40 and r1["last_loss"] == 2.5
        assert r1["pid"] == os.getpid() and r1["host"] == socket.gethostname()
        db.finish("r1", "finished", step=100, last_loss=2.0)
        db.finish("r2", "failed", error="RuntimeError: boom")
        runs = {r["id"]: r for r in db.list_runs()}
    assert [r["id"] for r in runs.values()] == ["r1", "r2", "r3"]
    assert runs["r1"]["status"] == "finished" and runs["r1"]["step"] == 100
    assert runs["r1"]["last_loss"] == 2.0 and runs["r1"]["end_time"] >= runs["r1"]["start_time"]
    assert runs["r2"]["status"] == "failed" and runs["r2"]["error"] == "RuntimeError: boom"
    assert runs["r3"]["status"] == "running"  # this process is alive
    for key in ("name", "world_size", "fingerprint", "start_time", "end_time"):
        assert key in runs["r1"]
    run = ExperimentsDB(tmp_path).get_run("r1")
    assert run is not None and run["config"] == {"train": {"lr": 0.1}}


def test_resume_restarts_same_id(tmp_path: Path) -> None:
    db = ExperimentsDB(tmp_path)
    _start(db, "r1")
    first = db.list_runs()[0]["start_time"]
    db.finish("r1", "killed")
    _start(db, "r1")
    [run] = db.list_runs()
    assert run["status"] == "running" and run["restarts"] == 1 and run["end_time"] is None
    assert run["start_time"] == first


def test_dead_pid_is_marked_killed_and_persisted(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        from braid.metrics import ExperimentsDB
        db = ExperimentsDB({str(tmp_path)!r})
        db.start("dead", name="d", run_dir="x", config={{}}, fingerprint="f", world_size=1,
                 git_rev=None)
        db.heartbeat("dead", step=7, last_loss=3.0)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)  # exits, reaped
    assert _raw_status(tmp_path, "dead") == "running"
    [run] = ExperimentsDB(tmp_path).list_runs()
    assert run["status"] == "killed" and run["step"] == 7
    assert "is gone" in run["error"] and run["end_time"] is not None
    assert _raw_status(tmp_path, "dead") == "killed"  # persisted, not just reported


def test_other_host_goes_stale(tmp_path: Path) -> None:
    db = ExperimentsDB(tmp_path, stale_after_s=60)
    _start(db, "fresh")
    _start(db, "stale")
    con = sqlite3.connect(tmp_path / "experiments.db")
    con.execute("UPDATE runs SET host = 'elsewhere', pid = 1")
    con.execute("UPDATE runs SET heartbeat_time = ? WHERE id = 'stale'", (time.time() - 120,))
    con.commit()
    con.close()
    runs = {r["id"]: r for r in db.list_runs()}
    assert runs["fresh"]["status"] == "running"
    assert runs["stale"]["status"] == "killed" and "no heartbeat" in runs["stale"]["error"]


def test_pid_alive() -> None:
    assert pid_alive(os.getpid())
    assert not pid_alive(0)
    if Path("/proc/self/stat").exists():  # a reused pid has another start time
        assert not pid_alive(os.getpid(), start_ticks=-1)


def test_schema_wal_and_version(tmp_path: Path) -> None:
    db = ExperimentsDB(tmp_path)
    assert (
        db.list_runs() == [] and not (tmp_path / "experiments.db").exists()
    )  # reading creates nothing
    _start(db, "r1")
    db.close()
    con = sqlite3.connect(tmp_path / "experiments.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    con.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    con.commit()
    con.close()
    with pytest.raises(BraidError, match="newer than this braid"):
        ExperimentsDB(tmp_path).list_runs()


def test_concurrent_writers(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            db = ExperimentsDB(tmp_path)
            _start(db, f"r{i}")
            for step in range(30):
                db.heartbeat(f"r{i}", step=step, last_loss=1.0)
            db.finish(f"r{i}", "finished", step=30)
            db.close()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    runs = ExperimentsDB(tmp_path).list_runs()
    assert sorted(r["id"] for r in runs) == ["r0", "r1", "r2", "r3"]
    assert {(r["status"], r["step"]) for r in runs} == {("finished", 30)}


def test_finish_rejects_unknown_status(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="finish status"):
        ExperimentsDB(tmp_path).finish("r1", "done")


def test_git_revision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert git_revision(tmp_path) is None  # not a work tree
    monkeypatch.setenv("PATH", "")
    assert git_revision(Path(__file__).parent) is None  # git missing


def test_format_runs() -> None:
    assert format_runs([]) == "no runs"
    now = 1_700_000_000.0
    runs = [
        dict(id="a1", name="tiny", status="finished", step=300, last_loss=2.12345,
             start_time=now - 3725, end_time=now - 5),
        dict(id="b22", name="medium-moe", status="running", step=None, last_loss=None,
             start_time=now - 42, end_time=None),
    ]  # fmt: skip
    lines = format_runs(runs, now=now).splitlines()
    assert lines[0].split() == [
        "id",
        "name",
        "status",
        "step",
        "last",
        "loss",
        "started",
        "duration",
    ]
    assert "2.1235" in lines[1] and "1h02m" in lines[1] and lines[2].endswith("42s")
    assert lines[1].index("finished") == lines[2].index("running")  # columns line up


def test_broken_db_warns_writers_and_fails_readers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "experiments.db").write_bytes(b"not a database" * 100)
    db = ExperimentsDB(tmp_path)
    _start(db, "r1")  # training goes on
    db.heartbeat("r1", step=1, last_loss=None)
    assert "not updated" in caplog.text
    with pytest.raises(BraidError, match="move it aside"):
        db.list_runs()


def test_heartbeat_from_another_thread(tmp_path: Path) -> None:
    db = ExperimentsDB(tmp_path)
    _start(db, "r1")
    t = threading.Thread(target=db.heartbeat, args=("r1",), kwargs=dict(step=5, last_loss=1.5))
    t.start()
    t.join()
    assert db.list_runs()[0]["step"] == 5
