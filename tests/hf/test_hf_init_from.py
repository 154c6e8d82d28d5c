"""`checkpoint.init_from`: a new run starts from the weights of an imported model.

* one process: `train` with init_from evaluates, before its first step, exactly the loss of
  the imported model (braid.load) on the same validation batches; the run is at step 0 with a
  fresh optimizer; a model config or tokenizer that does not match is refused in one line
  before anything is written;
* two gloo ranks, (dp=1, ep=2) and (dp=2, ep=1) in one spawn: every rank reads only the
  elements it holds (the reads add up to the model exactly once) and the first step's loss
  and grad norm equal the single process's.
"""

from __future__ import annotations

import pytest
import torch
from tiny_hf import VOCAB, save_hf

import braid
from braid.errors import BraidError
from harness import run_ranks
from tiny_run import prepare_words

pytest.importorskip("transformers")

OVERRIDES = [
    "--train.seq_len=32",
    "--train.batch_size=4",
    "--train.val_batches=2",
    "--train.progress=false",
    "--train.lr=1e-2",
]
LAYOUTS = {"dp1_ep2": ["--parallel.ep=2"], "dp2_ep1": ["--parallel.ep=1"]}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    from braid.hf.importer import import_hf

    root = tmp_path_factory.mktemp("init_from")
    save_hf("mixtral", root / "hf")
    model_dir = import_hf(root / "hf", root / "model")
    words = "a mixture of experts routes each token to the best two of eight".split()
    prepare_words(root, words, seed=1, count=6000, tokenizer=str(model_dir / "tokenizer.json"))
    return root, model_dir


def _cfg(root, model_dir, extra=()):
    from pathlib import Path

    from braid.config import load_config

    root, model_dir = Path(root), Path(model_dir)
    return load_config(
        str(model_dir / "model.toml"),
        [
            *OVERRIDES,
            f"--data.path={root / 'data'}",
            f"--run.dir={root / 'runs'}",
            f"--checkpoint.init_from={model_dir}",
            *extra,
        ],
    )


def test_train_starts_from_the_imported_weights(imported):
    from braid.parallel.mesh import ParallelContext
    from braid.train.model_setup import load_data
    from braid.train.trainer import evaluate, train

    root, model_dir = imported
    cfg = _cfg(root, model_dir, ["--train.steps=1", "--run.name=ft"])
    result = train(cfg)
    assert result["steps"] == 1
    ctx = ParallelContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    val = load_data(cfg, ctx)[3]
    model, _ = braid.load(model_dir)
    want = evaluate(model.transformer, val, cfg, torch.autocast("cpu", enabled=False), ctx)
    assert abs(result["initial_val_loss"] - want) < 1e-5


@pytest.mark.parametrize(
    "change,words",
    [
        (["--model.n_layers=3"], "model.n_layers=2 but this run has 3"),
        (["--moe.top_k=1"], "moe.top_k=2 but this run has 1"),
    ],
)
def test_init_from_refuses_another_model_before_writing(imported, change, words):
    from braid.train.trainer import train

    root, model_dir = imported
    with pytest.raises(BraidError, match=words) as e:
        train(_cfg(root, model_dir, ["--train.steps=1", "--run.name=bad", *change]))
    assert "\n" not in str(e.value)
    assert not (root / "runs" / "bad").exists()


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("moe", "routed_scaling", 2.5),
        ("moe", "score_func", "sigmoid"),
        ("moe", "num_experts", 4),
        ("model", "rope_theta", 500000.0),
    ],
)
def test_init_from_refuses_a_model_that_computes_otherwise(section, key, value):
    """Knobs that change what the weights compute (not only how they train) must match."""
    import re
    from pathlib import Path

    from braid.checkpoint.init_from import check_same_model
    from braid.config import Config

    saved = Config()
    run = saved.replace(**{section: {key: value}})
    words = rf"{section}\.{key}=.* but this run has {re.escape(repr(value))}"
    with pytest.raises(BraidError, match=words):
        check_same_model(run, saved, Path("model"))


def test_init_from_refuses_data_of_another_tokenizer(imported, tmp_path):
    from braid.data.prep import prepare
    from braid.train.trainer import train

    root, model_dir = imported
    (tmp_path / "t.txt").write_text("other words entirely " * 400)
    prepare(
        [tmp_path / "t.txt"], tmp_path / "data", vocab_size=280, val_fraction=0.1, progress=False
    )
    cfg = _cfg(
        root, model_dir, ["--train.steps=1", "--run.name=tok", f"--data.path={tmp_path / 'data'}"]
    )
    with pytest.raises(BraidError, match="braid prep --tokenizer"):
        train(cfg)


def _first_step(cfg, ctx) -> dict:
    """Load init_from into the model of this layout, run one training step on a fixed global
    batch (this rank's slice): global CE, grad norm, and the elements this rank read."""
    from braid.checkpoint.init_from import load_init
    from braid.parallel.clip import clip_grad_norm
    from braid.train.model_setup import build_model
    from braid.train.trainer import autocast, loss_fn

    model = build_model(cfg, ctx, init=False)
    read = load_init(model, cfg.checkpoint.init_from, cfg)
    x = torch.randint(0, VOCAB, (4, 33), generator=torch.Generator().manual_seed(0))
    b = x.shape[0] // ctx.world
    x = x[ctx.rank * b : (ctx.rank + 1) * b]
    loss, parts = loss_fn(model, x[:, :-1], x[:, 1:], cfg, autocast(cfg, ctx.device))
    loss.backward()
    norm = float(clip_grad_norm(model, cfg.train.grad_clip, ctx))
    ce = parts["ce"].detach()
    if ctx.distributed:
        from braid.parallel.distributed import all_reduce_mean

        ce = all_reduce_mean(ce, ctx)
    return {"ce": float(ce), "norm": norm, "read": read}


def _rank_checks(rank: int, world: int, root: str, model_dir: str) -> dict:
    from braid.parallel.distributed import init_distributed

    out = {}
    for name, layout in LAYOUTS.items():
        cfg = _cfg(root, model_dir, layout)
        out[name] = _first_step(cfg, init_distributed(cfg))
    return out


def test_init_from_under_ep2_matches_one_process(imported):
    from braid.parallel.mesh import ParallelContext

    root, model_dir = imported
    ctx = ParallelContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    ref = _first_step(_cfg(root, model_dir), ctx)
    total = ref["read"]
    cfg = _cfg(root, model_dir)
    # The routing-bias buffers are whole on every rank; every parameter element is read once.
    buffers = cfg.moe.num_experts * len(cfg.moe.moe_layer_ids(cfg.model.n_layers))
    ranks = run_ranks(_rank_checks, 2, str(root), str(model_dir))
    for name in LAYOUTS:
        got = [r[name] for r in ranks]
        assert sum(g["read"] for g in got) == total + buffers, name
        assert all(g["read"] < total for g in got), name
        for g in got:
            assert abs(g["ce"] - ref["ce"]) <= 1e-5 * abs(ref["ce"]), (name, g, ref)
            assert abs(g["norm"] - ref["norm"]) <= 1e-4 * ref["norm"], (name, g, ref)
