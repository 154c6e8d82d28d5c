"""Run directories: made and locked before anything is written; a refused writer never removes a
directory, even one it made itself a moment before another writer locked it."""

from __future__ import annotations

import os

import pytest

from braid.config import Config
from braid.errors import BraidError
from braid.train.rundir import discard_new_run_dir, open_run_dir, write_run_files
from braid.train.runlock import RunLock


def _cfg(tmp_path) -> Config:
    return Config().replace(run={"dir": str(tmp_path / "runs")})


def test_open_says_whether_it_made_the_directory_and_writes_nothing(tmp_path):
    cfg = _cfg(tmp_path)
    lock = RunLock(tmp_path / "runs" / "r")
    run_dir, created = open_run_dir(cfg, "r", lock)
    try:
        assert created and {p.name for p in run_dir.iterdir()} == {".lock"}
        write_run_files(cfg, run_dir)
        assert {"config.toml", "config.json"} <= {p.name for p in run_dir.iterdir()}
    finally:
        lock.release()
    again = RunLock(run_dir)
    assert open_run_dir(cfg, "r", again) == (run_dir, False)
    again.release()


def test_a_refused_writer_leaves_the_directory_it_made_to_the_one_that_locked_it(tmp_path):
    cfg = _cfg(tmp_path)
    run_dir = tmp_path / "runs" / "r"
    winner = RunLock(run_dir)

    class LateLock(RunLock):  # the other trainer locks between this one's mkdir and its lock
        def acquire(self):
            winner.acquire()
            return super().acquire()

    try:
        with pytest.raises(BraidError, match="in use"):
            open_run_dir(cfg, "r", LateLock(run_dir))
        assert run_dir.is_dir() and (run_dir / ".lock").exists()
        discard_new_run_dir(run_dir, created=False)  # not ours: never removed
        assert run_dir.is_dir()
    finally:
        winner.release()
    discard_new_run_dir(run_dir, created=True)  # ours, holding only the lock file: removed
    assert not run_dir.exists()


def test_busy_names_the_holder_and_takes_nothing(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    probe = RunLock(run_dir)
    assert probe.busy() is None  # no lock file yet: nothing is created either
    assert not (run_dir / ".lock").exists()
    with RunLock(run_dir):
        err = probe.busy()
        assert err is not None and f"in use by pid {os.getpid()}" in str(err)
    assert probe.busy() is None  # released
    with RunLock(run_dir):  # the probe took nothing: acquiring after it works
        pass


def test_acquire_waits_out_a_probe_s_momentary_shared_lock(tmp_path):
    """Another job's `busy` probe holds a shared lock for an instant: a writer acquiring at
    that moment retries instead of being refused (a lock held for good still refuses it)."""
    import fcntl
    import threading

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    RunLock(run_dir).acquire().release()  # the lock file exists, as for a running run
    fd = os.open(run_dir / ".lock", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # the probe, caught mid-way
    threading.Timer(0.06, os.close, (fd,)).start()  # ... ends a moment later
    RunLock(run_dir).acquire().release()
    held = RunLock(run_dir).acquire()
    with pytest.raises(BraidError, match="in use by pid"):
        RunLock(run_dir).acquire()
    held.release()


def test_a_lock_file_with_a_bad_start_time_still_names_its_holder(tmp_path):
    import json

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    with RunLock(run_dir) as held:
        held.path.write_text(json.dumps({"pid": 42, "host": "h", "since": "yesterday"}))
        err = RunLock(run_dir).busy()
    assert err is not None and "in use by pid 42 on h:" in str(err)
