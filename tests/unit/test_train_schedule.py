"""The optimizer side of the loop: the warmup + cosine schedule at exact values, which parameters
get weight decay, and grad accumulation giving the run of one micro-step per optimizer step (the
same loss, grad norm, learning rate and token count at every step, validation at start, every
val_every steps and once at the end)."""

from __future__ import annotations

import math

import pytest
import torch

import braid.train.trainer as trainer
from braid.config import load_config
from braid.model.transformer import Transformer
from braid.train.log import TrainLogger
from braid.train.optim import build_optimizer, lr_at
from tiny_run import TINY_MODEL, prepare_words

_LOG_TRAIN, _EVALUATE = TrainLogger.train, trainer.evaluate


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    tc = load_config(
        None, ["--train.lr=1.0", "--train.warmup=4", "--train.steps=14", "--train.min_lr_ratio=0.1"]
    ).train
    # Warmup: step s (0-based) trains at lr * (s + 1) / warmup, reaching lr at its last step.
    assert [lr_at(s, tc) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0], abs=1e-15)
    # Cosine over the 10 steps after warmup, from lr down towards lr * min_lr_ratio.
    for s in range(4, 14):
        want = 0.1 + 0.45 * (1 + math.cos(math.pi * (s - 4) / 10))
        assert lr_at(s, tc) == pytest.approx(want, abs=1e-15), s
    assert lr_at(4, tc) == 1.0 and lr_at(9, tc) == pytest.approx(0.55, abs=1e-15)
    no_warmup = load_config(None, ["--train.warmup=0", "--train.steps=10"]).train
    assert lr_at(0, no_warmup) == no_warmup.lr


def test_weight_decay_is_on_matrices_only_not_norms_biases_or_embeddings():
    cfg = load_config(
        None,
        [
            *TINY_MODEL,
            "--model.qkv_bias=true",
            "--model.tie_embeddings=false",
            "--train.weight_decay=0.25",
        ],
    )
    model = Transformer(cfg.model, cfg.moe)
    opt = build_optimizer(model, cfg.train, torch.device("cpu"))
    name = {id(p): n for n, p in model.named_parameters()}
    decay = {g["weight_decay"]: {name[id(p)] for p in g["params"]} for g in opt.param_groups}
    assert sorted(decay) == [0.0, 0.25]
    assert decay[0.0] | decay[0.25] == set(name.values())
    dims = dict(model.named_parameters())
    assert decay[0.0] == {n for n, p in dims.items() if p.ndim < 2 or n == "tok_emb.weight"}
    assert any("norm" in n for n in decay[0.0]) and any("bias" in n for n in decay[0.0])
    assert "output.weight" in decay[0.25] and "blocks.0.attn.wq.weight" in decay[0.25]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("accum")
    words = "two half batches make one whole batch and one optimizer step".split()
    return prepare_words(root, words, seed=4, count=4000)


def _logged_run(monkeypatch, data, run_dir, accum: int) -> tuple[list[tuple], int]:
    """The (step, loss, lr, grad norm, tokens) of every log call and the number of validations
    of a 4-step run of a dense tiny model (no router losses: micro-batches change nothing)."""
    rows, vals = [], [0]

    def record(self, step, loss, lr, grad_norm, skipped, tokens, seconds):
        rows.append((step, loss, lr, grad_norm, tokens))
        return _LOG_TRAIN(self, step, loss, lr, grad_norm, skipped, tokens, seconds)

    def counted(*args, **kwargs):
        vals[0] += 1
        return _EVALUATE(*args, **kwargs)

    monkeypatch.setattr(TrainLogger, "train", record)
    monkeypatch.setattr(trainer, "evaluate", counted)
    cfg = load_config(
        None,
        [
            *TINY_MODEL,
            "--moe.num_experts=0",
            "--train.batch_size=4",
            f"--train.grad_accum={accum}",
            "--train.seq_len=16",
            "--train.steps=4",
            "--train.warmup=2",
            "--train.lr=1e-2",
            "--train.log_every=1",
            "--train.val_every=2",
            "--train.val_batches=1",
            "--train.progress=false",
            "--checkpoint.every=100",
            f"--data.path={data}",
            f"--run.dir={run_dir}",
            f"--run.name=accum{accum}",
        ],
    )
    trainer.train(cfg)
    return rows, vals[0]


def test_grad_accumulation_trains_like_one_micro_step(monkeypatch, data, tmp_path):
    """batch_size 4 as 2 micro-steps of 2 sequences: the loader hands out the same windows, so
    the logged loss is the mean over the global batch, the gradient (and its norm) that of the
    global batch's mean loss, and every step counts batch_size * seq_len tokens."""
    one, vals_one = _logged_run(monkeypatch, data, tmp_path, 1)
    two, vals_two = _logged_run(monkeypatch, data, tmp_path, 2)
    assert [r[0] for r in one] == [r[0] for r in two] == [1, 2, 3, 4]
    assert [r[4] for r in one] == [r[4] for r in two] == [4 * 16] * 4
    floor = 1e-2 * 0.1  # the default min_lr_ratio
    want_lr = [5e-3, 1e-2, 1e-2, floor + 0.5 * (1e-2 - floor)]
    assert [r[2] for r in two] == pytest.approx(want_lr, rel=1e-12)
    for a, b in zip(one, two, strict=True):
        assert b[1] == pytest.approx(a[1], rel=1e-5), (a, b)  # loss
        assert b[3] == pytest.approx(a[3], rel=1e-4), (a, b)  # grad norm
    assert vals_one == vals_two == 3  # at the start, at step 2, at the end (step 4: once)
