"""`braid import`: every supported Hugging Face architecture gives transformers' logits.

For each architecture a tiny random model (perturbed so a misplaced tensor shows) is saved in
several shards, imported, and both the imported directory and the HF directory itself (through
braid.load) must give transformers' fp32 logits within 1e-4. A bf16 checkpoint imports into
bf16 tensors equal to the source's, and memory-bounded reading is exercised by shards smaller
than one layer.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from tiny_hf import VOCAB, save_hf

import braid
from braid.hf.importer import import_hf

pytest.importorskip("transformers")

TOL = 1e-4
ARCHS = ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v3"]
# Options of the same architectures: YaRN; MLA without q LoRA on half-split RoPE rows;
# sliding windows on every layer (Mixtral) or the layers layer_types names (Qwen2-MoE).
VARIANTS = ["qwen3_moe_yarn", "deepseek_v3_plain", "mixtral_window", "qwen2_moe_window"]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("kind", ARCHS + VARIANTS)
def test_import_matches_transformers_logits(kind, tmp_path):
    ref = save_hf(kind, tmp_path / "hf")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 2  # really sharded
    out = import_hf(tmp_path / "hf", tmp_path / "braid")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "model.toml",
        "tokenizer.json",
    ]
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    want = _logits(ref, ids)
    for path in (out, tmp_path / "hf"):  # imported directory, and the HF directory directly
        model, tok = braid.load(path)
        got = model(ids)
        assert got.shape == (2, 16, VOCAB)
        assert (got - want).abs().max().item() < TOL, path
        assert tok.encode("a mixture") and tok.eot_id == 0


def test_yarn_factor_is_read_and_derived_only_when_missing():
    """transformers' YaRN uses rope_parameters.factor; only a missing factor is derived as
    max_position_embeddings / original_max_position_embeddings."""
    from braid.hf.base import HFConfig
    from braid.hf.rope import read_rope

    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "original_max_position_embeddings": 16}
    for extra, want in (({"factor": 2.0}, 2.0), ({}, 4.0)):
        raw = {"max_position_embeddings": 64, "rope_parameters": {**yarn, **extra}}
        assert read_rope(HFConfig(raw, "c.json"), softmax_mscale=False)["rope_factor"] == want


def test_bf16_checkpoint_keeps_bf16_values(tmp_path):
    ref = save_hf("mixtral", tmp_path / "hf", dtype=torch.bfloat16)
    out = import_hf(tmp_path / "hf", tmp_path / "braid")
    sd = ref.state_dict()
    with safe_open(out / "model.safetensors", "pt") as f:
        emb, router = f.get_tensor("tok_emb.weight"), f.get_tensor("blocks.1.ffn.router.weight")
        w2 = f.get_tensor("blocks.0.ffn.experts.w2")
    assert emb.dtype == torch.bfloat16 and torch.equal(emb, sd["model.embed_tokens.weight"])
    assert torch.equal(router, sd["model.layers.1.mlp.gate.weight"])
    # Braid stacks experts as [E, F, D]; transformers' fused down_proj is [E, D, F].
    assert torch.equal(w2, sd["model.layers.0.mlp.experts.down_proj"].transpose(1, 2))
    # The reference: the bf16 weights in fp32 arithmetic (a fresh load, so RoPE's inv_freq is
    # computed in fp32 rather than cast down to bf16 and back with the model).
    from transformers import AutoModelForCausalLM

    ref32 = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    model, _ = braid.load(out)
    assert (model(ids) - _logits(ref32, ids)).abs().max().item() < TOL


def test_generate_runs_on_an_imported_directory(tmp_path):
    save_hf("mixtral", tmp_path / "hf")
    out = import_hf(tmp_path / "hf", tmp_path / "braid")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "braid",
            "generate",
            "--run",
            str(out),
            "--prompt",
            "a mixture",
            "--max-new-tokens",
            "4",
            "--cpu",
            "--temperature",
            "0",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("a mixture")
