"""Runs for the dashboard tests: the `braid train` command on the built-in corpus and a
finished run registered without training (imported by name, not from conftest: another test
folder's conftest may be the module `conftest` when both folders are collected)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from braid.metrics import ExperimentsDB
from harness import SMALL_MODEL

TRAIN = [
    *SMALL_MODEL,
    "--model.vocab_size=300",  # the built-in corpus trains a byte-level BPE: >= 257
    "--train.batch_size=4",
    "--train.warmup=2",
    "--train.val_batches=1",
    "--train.val_every=10",
    "--train.log_every=1",
    "--train.progress=false",
    "--checkpoint.every=0",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train_command(root: Path, name: str, steps: int, *extra: str) -> list[str]:
    """`python -m braid train` on the built-in corpus into run root `root`."""
    return [sys.executable, "-m", "braid", "train", *TRAIN, f"--train.steps={steps}",
            f"--run.dir={root}", f"--run.name={name}", *extra]  # fmt: skip


def register_run(root: Path, run_id: str, name: str = "", config: dict | None = None) -> None:
    """A finished run in `root`'s registry, without training it."""
    db = ExperimentsDB(root)
    db.start(run_id, name=name or run_id, run_dir=str(root / run_id), config=config or {},
             fingerprint="f", world_size=1, git_rev=None)  # fmt: skip
    db.finish(run_id, "finished", step=1)
    db.close()
