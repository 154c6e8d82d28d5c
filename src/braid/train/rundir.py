"""Run directories: `<run.dir>/<run_id>/` with the resolved config, written before training.

Layout of a run directory:
  config.toml, config.json   the resolved config (every key) and its fingerprint
  tokenizer.json             the tokenizer of the training data (for generation)
  checkpoints/step_XXXXXXXX  DCP checkpoints (see braid.checkpoint)
  metrics/rank_<r>.duckdb     per-step metrics (see braid.metrics.store)
  summary.json               the final JSON line of `braid train`
  report.html, report/       written by `braid report`
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from braid.config import Config, to_toml
from braid.errors import StorageError
from braid.train.runlock import LOCK_FILE, RunLock


def new_run_id(cfg: Config) -> str:
    """`run.name` if given (so `checkpoint.resume=auto` finds the run again), else time + hash."""
    if cfg.run.name:
        return cfg.run.name
    return time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.fingerprint()[:6]}-{os.getpid() % 10000:04d}"


def write_json_atomic(path: Path, obj: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def open_run_dir(cfg: Config, run_id: str, lock: RunLock | None = None) -> tuple[Path, bool]:
    """(run directory, whether this call created it), made and locked before anything is
    written into it: with `lock`, a second writer is refused, leaving the first one's files
    alone. Nothing else is written here: the config and tokenizer follow once the run is known
    to start (`write_run_files`), so a refused resume leaves an existing run as it was.
    Unwritable or full storage is a one-line StorageError."""
    run_dir = Path(cfg.run.dir) / run_id
    try:
        run_dir.mkdir(parents=True)
        created = True
    except FileExistsError:
        created = False  # an existing run, or another trainer's that made it a moment ago
    except OSError as e:
        raise StorageError(e, run_dir, "create the run directory") from None
    if lock is not None:
        lock.acquire()  # refused: the directory is left alone, it may be another writer's now
    return run_dir, created


def write_run_files(cfg: Config, run_dir: Path, tokenizer_path: str | Path | None = None) -> None:
    """The resolved config (config.toml, config.json) and the tokenizer generation needs."""
    try:
        if tokenizer_path is not None:
            tmp = run_dir / "tokenizer.json.tmp"
            shutil.copyfile(tokenizer_path, tmp)
            os.replace(tmp, run_dir / "tokenizer.json")
        tmp = run_dir / "config.toml.tmp"
        tmp.write_text(to_toml(cfg))
        os.replace(tmp, run_dir / "config.toml")
        write_json_atomic(
            run_dir / "config.json", {"fingerprint": cfg.fingerprint(), "config": cfg.to_dict()}
        )
    except OSError as e:
        raise StorageError(e, run_dir, "write the run directory") from None


def discard_new_run_dir(run_dir: Path, created: bool) -> None:
    """Remove a run directory this process created for a run that was refused before it
    started: only while it holds nothing but the lock file (never anyone else's files). Call
    it while still holding the run's lock, so no other writer can have taken the directory."""
    if not created:
        return
    try:
        if {p.name for p in run_dir.iterdir()} <= {LOCK_FILE}:
            shutil.rmtree(run_dir, ignore_errors=True)
    except OSError:
        pass
