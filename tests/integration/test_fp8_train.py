"""train.precision=fp8 end to end on CPU (emulated): a tiny run's loss curve stays within a
stated bound of the fp32 run, fp8 numerics are logged as `fp8/*` metrics at log steps, and a
checkpoint resumes across a precision change only with checkpoint.allow_safe_changes."""

from pathlib import Path

import pytest

from braid.errors import BraidError
from braid.metrics import read_metrics
from tiny_run import TINY_MODEL, prepare_words, train_logged

TINY = [
    *TINY_MODEL,
    "--train.batch_size=8",
    "--train.seq_len=32",
    "--train.warmup=5",
    "--train.val_batches=1",
    "--train.val_every=100",
    "--train.log_every=5",
    "--train.progress=false",
    "--checkpoint.every=100",
]
STEPS = 40
# Stated bound: e4m3 GEMMs (rowwise scales) keep every logged train loss within 3% of fp32's on
# this run and the final one within 2% (measured: at most 1.1%, final 0.8%; the runs drift apart
# like any two runs whose GEMMs round differently, not by a bias).
STEP_TOL, FINAL_TOL = 0.03, 0.02


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    words = "the quick brown fox jumps over a lazy dog while experts route every token".split()
    data = prepare_words(root, words, seed=0, count=4000, files=3)
    return TINY + [f"--data.path={data}", f"--run.dir={root / 'runs'}"]


def test_fp8_loss_curve_tracks_fp32_and_logs_numerics(base):
    ref, _ = train_logged(base + [f"--train.steps={STEPS}", "--run.name=fp32"])
    got, result = train_logged(
        base + [f"--train.steps={STEPS}", "--run.name=fp8", "--train.precision=fp8"]
    )
    assert sorted(got) == sorted(ref) == list(range(5, STEPS + 1, 5))
    rel = {s: abs(got[s] - ref[s]) / ref[s] for s in ref}
    print({s: round(r, 5) for s, r in rel.items()})
    assert ref[STEPS] < 0.7 * ref[5]  # it learns, so the comparison means something
    assert max(rel.values()) < STEP_TOL and rel[STEPS] < FINAL_TOL
    assert got != ref  # fp8 really ran
    m = read_metrics(Path(result["run_dir"]))
    amax = m["fp8/blocks.1.ffn.experts.w13/x/amax"]
    assert [s for s, _ in amax] == list(range(5, STEPS + 1, 5))  # once per log interval
    under = dict(m["fp8/blocks.0.attn.wq/grad/underflow"])
    assert all(0 <= v < 0.05 for v in under.values()) and all(v > 0 for _, v in amax)
    assert "fp8/output/x/amax" not in m  # the output head is in fp8_skip by default


def test_resume_across_precision_needs_allow_safe_changes(base):
    name = ["--run.name=switch", "--train.steps=6"]
    train_logged(base + name + ["--train.stop_at=3"])
    with pytest.raises(BraidError, match=r"train.precision 'bf16' -> 'fp8'.*allow_safe"):
        train_logged(base + name + ["--train.precision=fp8"])
    losses, result = train_logged(
        base + name + ["--train.precision=fp8", "--checkpoint.allow_safe_changes=true"]
    )
    assert result["steps"] == 6 and list(losses) == [5, 6]
