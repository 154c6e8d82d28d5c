"""Resuming a run: stop + resume is bitwise the unbroken run, SIGKILL during a save leaves the
previous checkpoint to resume from (and the metrics up to the kill), and a changed config is
refused unless the change is safe.

Every run is the tiny model on a small synthetic corpus prepared once per module.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from braid.checkpoint import paths
from braid.checkpoint.load import load_checkpoint_model
from braid.checkpoint.manager import Checkpointer
from braid.errors import BraidError
from braid.metrics import read_metrics
from tiny_run import TINY_MODEL, prepare_words, train_logged

TINY = [
    *TINY_MODEL,
    "--train.batch_size=4",
    "--train.seq_len=32",
    "--train.steps=6",
    "--train.warmup=2",
    "--train.val_batches=1",
    "--train.val_every=2",
    "--train.log_every=1",
    "--train.progress=false",
    "--checkpoint.every=2",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(overrides with data and run root, per-step losses of the unbroken 6-step run)."""
    root = tmp_path_factory.mktemp("resume")
    words = "the quick brown fox jumps over a lazy dog while experts route every token".split()
    data = prepare_words(root, words, seed=0, count=4000, files=3)
    overrides = TINY + [f"--data.path={data}", f"--run.dir={root / 'runs'}"]
    losses, result = train_logged(overrides + ["--run.name=full"])
    assert result["steps"] == 6 and sorted(losses) == [1, 2, 3, 4, 5, 6]
    return overrides, losses


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    model, _ = load_checkpoint_model(paths.latest(run_dir), torch.device("cpu"))
    return model.state_dict()


def test_stop_at_then_resume_is_bitwise_the_unbroken_run(setup):
    overrides, reference = setup
    split = overrides + ["--run.name=split"]
    first, r1 = train_logged(split + ["--train.stop_at=3"])
    assert r1["steps"] == 3 and list(first) == [1, 2, 3]
    second, r2 = train_logged(split)  # the same command without stop_at: checkpoint.resume=auto
    assert r2["steps"] == 6 and list(second) == [4, 5, 6]
    assert {**first, **second} == reference  # float ==: every loss bit for bit
    full, resumed = weights(Path(r2["run_dir"]).parent / "full"), weights(Path(r2["run_dir"]))
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    # keep_last=2 of the saves at 2, 4, 6 (split also saved at its stop, step 3)
    assert [s for s, _ in paths.complete_checkpoints(Path(r2["run_dir"]))] == [4, 6]
    third, r3 = train_logged(split)  # once more: nothing left to train, the same result
    assert third == {} and r3["steps"] == 6
    assert r3["final_train_loss"] == r2["final_train_loss"] == round(reference[6], 6)


WRAPPER = """
    import sys, time
    from pathlib import Path
    import braid.checkpoint.manager as manager
    from braid.cli import main

    real = manager.save_tensors

    def pausing(tree, path, *args):
        real(tree, path, *args)  # step 4's tensors are on disk, its meta.json is not
        if path.name.endswith("step_00000004"):
            Path(sys.argv[1]).touch()
            time.sleep(600)

    manager.save_tensors = pausing
    sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_during_save_leaves_previous_checkpoint_and_auto_resumes_it(setup, tmp_path):
    overrides, reference = setup
    killed = overrides + ["--run.name=killed"]
    script, flag = tmp_path / "pausing_save.py", tmp_path / "paused"
    script.write_text(textwrap.dedent(WRAPPER))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(flag), "train", *killed],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while not flag.exists():
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the run never reached its step-4 save"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)  # a no-op if it already exited
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    run_dir = Path(overrides[-1].split("=", 1)[1]) / "killed"
    assert paths.tmp_path(run_dir, 4).is_dir()  # the interrupted save
    assert paths.latest(run_dir) == paths.final_path(run_dir, 2)
    # The metrics reached the disk before each save: readable up to the step of the kill.
    metrics = read_metrics(run_dir)
    assert dict(metrics["train/loss"]) == {s: reference[s] for s in (1, 2, 3, 4)}
    assert [s for s, _ in metrics["val/loss"]] == [0, 2, 4]

    losses, result = train_logged(killed)  # the same command again: resumes from step 2
    assert result["steps"] == 6 and list(losses) == [3, 4, 5, 6]
    assert losses == {s: reference[s] for s in (3, 4, 5, 6)}
    assert not paths.tmp_path(run_dir, 4).exists()  # cleaned up by the next save


def test_a_periodic_save_at_the_last_step_is_not_written_twice(setup, monkeypatch):
    overrides, _ = setup
    saved, real = [], Checkpointer.save

    def counting(self, model, opt, loader, state):
        saved.append(state.step)
        return real(self, model, opt, loader, state)

    monkeypatch.setattr(Checkpointer, "save", counting)
    train_logged(overrides + ["--run.name=once", "--train.steps=4"])  # checkpoint.every=2
    assert saved == [2, 4]


def test_changed_config_is_refused_unless_safe_and_allowed(setup):
    overrides, _ = setup
    base = overrides + ["--run.name=changed"]
    train_logged(base + ["--train.stop_at=2"])
    with pytest.raises(BraidError, match=r"train.lr 0.003 -> 0.001; these change the model"):
        train_logged(base + ["--train.lr=1e-3"])
    with pytest.raises(BraidError, match=r"train.steps 6 -> 8; .*allow_safe_changes=true"):
        train_logged(base + ["--train.steps=8"])
    losses, result = train_logged(
        base + ["--train.steps=8", "--train.stop_at=3", "--checkpoint.allow_safe_changes=true"]
    )
    assert result["steps"] == 3 and list(losses) == [3]
    # How often to save never needs permission (the default changed once, from 0 to 100).
    losses, result = train_logged(
        base + ["--train.steps=8", "--train.stop_at=4", "--checkpoint.every=3"]
    )
    assert result["steps"] == 4 and list(losses) == [4]
