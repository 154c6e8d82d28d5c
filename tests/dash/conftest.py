"""Fixtures for the dashboard tests: a run root trained by `braid train` (two short runs that
differ in the learning rate, the second with the overlap report on), and this folder on
sys.path for dash_browser.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from braid.metrics import ExperimentsDB  # noqa: E402
from harness import SMALL_MODEL  # noqa: E402

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


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A run root with finished runs `a` (30 steps) and `b` (30 steps, lr 1e-3, overlap report)."""
    root = tmp_path_factory.mktemp("dash") / "runs"
    for name, extra in (("a", []), ("b", ["--train.lr=1e-3", "--overlap.report=true"])):
        cmd = train_command(root, name, 30, *extra)
        proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root
