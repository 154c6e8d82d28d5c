"""`braid export --format hf`: transformers loads the export with nothing missing, unexpected or
mismatched and computes Braid's logits; export -> import gives back every tensor bit for bit.

Each supported architecture gets a random Braid model with the options it holds; a short
training run (a real run directory, with the routing bias of aux-free balancing zero) goes
through the CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from tiny_hf import BRAID_MODELS, VOCAB, save_braid

import braid
from braid.hf.exporter import export_hf
from braid.hf.importer import import_hf
from tiny_run import prepare_words

transformers = pytest.importorskip("transformers")
TOL = 1e-4


def _hf_load(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, output_loading_info=True, dtype=torch.float32
    )
    assert {k: v for k, v in info.items() if v} == {}, info  # nothing missing/unexpected/...
    return model.eval()


def _tensors(path):
    with safe_open(path / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("arch", sorted(BRAID_MODELS))
def test_export_loads_in_transformers_and_round_trips_bitwise(arch, tmp_path):
    src = save_braid(BRAID_MODELS[arch], tmp_path / "braid")
    out = export_hf(src, tmp_path / "hf", dtype="fp32", max_shard_size="16KB")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch  # chosen automatically from the Braid config
    assert (out / "model.safetensors.index.json").is_file()
    ref = _hf_load(out)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    model, tok = braid.load(src)
    with torch.no_grad():
        assert (ref(ids).logits - model(ids)).abs().max().item() < TOL
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "a mixture of experts routes each token"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)

    back = import_hf(out, tmp_path / "back")
    a, b = _tensors(src), _tensors(back)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_bf16_export_holds_the_rounded_weights(tmp_path):
    src = save_braid(BRAID_MODELS["mixtral"], tmp_path / "braid")
    out = export_hf(src, tmp_path / "hf", dtype="bf16")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    with safe_open(out / "model.safetensors", "pt") as f:
        emb = f.get_tensor("model.embed_tokens.weight")
    assert emb.dtype == torch.bfloat16
    assert torch.equal(emb, _tensors(src)["tok_emb.weight"].to(torch.bfloat16))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from braid.config import load_config
    from braid.train.trainer import train

    root = tmp_path_factory.mktemp("hfrun")
    words = "a mixture of experts routes each token to the best two of eight".split()
    data = prepare_words(root, words, seed=1, count=6000, vocab_size=VOCAB)
    cfg = load_config(
        None,
        [
            "--model.vocab_size=300",
            "--model.dim=32",
            "--model.n_heads=4",
            "--model.n_layers=2",
            "--model.max_seq_len=64",
            "--moe.first_k_dense=0",
            "--moe.num_experts=4",
            "--moe.expert_hidden=16",
            "--train.batch_size=4",
            "--train.seq_len=32",
            "--train.steps=2",
            "--train.val_batches=1",
            "--train.progress=false",
            f"--data.path={data}",
            f"--run.dir={root / 'runs'}",
            "--run.name=r",
        ],
    )
    train(cfg)
    return root / "runs" / "r"


def test_cli_exports_a_run_that_transformers_computes(trained_run, tmp_path):
    out = tmp_path / "hf"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "braid",
            "export",
            "--run",
            str(trained_run),
            "--out",
            str(out),
            "--format",
            "hf",
            "--dtype",
            "fp32",
            "--arch",
            "MixtralForCausalLM",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    mask = os.umask(0)
    os.umask(mask)
    for p in out.iterdir():  # readable as the umask allows (safetensors alone writes 0600)
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p
    ref = _hf_load(out)
    model, _ = braid.load(trained_run)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ref(ids).logits - model(ids)).abs().max().item() < TOL
