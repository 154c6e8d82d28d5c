"""Non-finite steps: a forced NaN stops `braid train` with exit code 2 and a message naming the
step, with no checkpoint for that step or after it; with train.skip_nonfinite the run finishes
and counts the skipped step. The NaN is injected by monkeypatching the loss, not by a knob."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import braid.train.trainer as trainer
from braid.checkpoint import paths
from braid.checkpoint.load import load_checkpoint_model
from braid.config import load_config
from tiny_run import TINY_MODEL, prepare_words

TINY = [
    *TINY_MODEL,
    "--train.batch_size=4",
    "--train.seq_len=32",
    "--train.steps=6",
    "--train.val_batches=1",
    "--train.progress=false",
    "--checkpoint.every=2",
    "--checkpoint.keep_last=5",
]
BAD_STEP = 4

# Multiplies the loss of the BAD_STEP-th micro-step by NaN, so every gradient is NaN.
POISON = """
    import sys
    import braid.train.trainer as trainer
    from braid.cli import main

    real, calls = trainer.loss_fn, [0]

    def poisoned(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        calls[0] += 1
        return (loss * float("nan") if calls[0] == {bad} else loss), parts

    trainer.loss_fn = poisoned
    sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def overrides(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    words = "loss goes up and then the gradient is not a number at all".split()
    data = prepare_words(root, words, seed=2, count=8000)
    return TINY + [f"--data.path={data}", f"--run.dir={root / 'runs'}"]


def test_nan_stops_with_exit_2_naming_the_step_and_no_later_checkpoint(overrides, tmp_path):
    script = tmp_path / "poison.py"
    script.write_text(textwrap.dedent(POISON).replace("{bad}", str(BAD_STEP)))
    proc = subprocess.run(
        [sys.executable, str(script), "train", *overrides, "--run.name=poisoned"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: non-finite gradient norm at step 4 (first bad gradient: ")
    assert "Traceback" not in proc.stderr
    run_dir = Path(overrides[-1].split("=", 1)[1]) / "poisoned"
    assert [s for s, _ in paths.complete_checkpoints(run_dir)] == [2]
    assert sorted(p.name for p in (run_dir / paths.CKPT_DIR).iterdir()) == ["step_00000002"]


def test_skip_nonfinite_finishes_and_counts_the_skipped_step(overrides, monkeypatch):
    real, calls = trainer.loss_fn, [0]

    def poisoned(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        calls[0] += 1
        return (loss * float("nan") if calls[0] == BAD_STEP else loss), parts

    monkeypatch.setattr(trainer, "loss_fn", poisoned)
    cfg = load_config(None, overrides + ["--run.name=skip", "--train.skip_nonfinite=true"])
    result = trainer.train(cfg)
    assert result["steps"] == 6 and result["skipped_steps"] == 1
    summary = json.loads((Path(result["run_dir"]) / "summary.json").read_text())
    assert summary["skipped_steps"] == 1
    model, _ = load_checkpoint_model(paths.latest(Path(result["run_dir"])), torch.device("cpu"))
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
