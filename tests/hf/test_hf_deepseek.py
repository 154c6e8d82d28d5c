"""DeepSeek-V3 specifics transformers does not cover: MTP weights and fp8 checkpoints.

* MTP: a Braid model with MTP exports its modules as DeepSeek's checkpoints store them
  (model.layers.{N+k}: enorm, hnorm, eh_proj, shared_head.norm, copies of the embedding and
  head), imports back bit for bit, and the imported MTP input projection computes DeepSeek's
  formula eh_proj([enorm(emb); hnorm(h)]) written out here from the HF tensors;
* fp8: weights quantized in 8x8 (and 4x8) blocks with `weight_scale_inv` (as DeepSeek ships them)
  import into the model whose weights are the blockwise dequantization (a naive per-block
  loop here), which transformers then computes within 1e-4.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_hf import BRAID_MODELS, VOCAB, save_braid, save_hf

import braid
from braid.hf.exporter import export_hf
from braid.hf.importer import import_hf

transformers = pytest.importorskip("transformers")


def test_mtp_weights_round_trip_in_deepseek_layout(tmp_path):
    src = save_braid(BRAID_MODELS["deepseek_v3"] + ["--model.mtp_depth=1"], tmp_path / "b")
    out = export_hf(src, tmp_path / "hf", dtype="fp32")
    config = json.loads((out / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1
    n = config["num_hidden_layers"]
    with safe_open(out / "model.safetensors", "pt") as f:
        hf = {k: f.get_tensor(k) for k in f.keys()}
    mtp = f"model.layers.{n}"
    assert torch.equal(hf[f"{mtp}.embed_tokens.weight"], hf["model.embed_tokens.weight"])
    assert torch.equal(hf[f"{mtp}.shared_head.head.weight"], hf["lm_head.weight"])
    back = import_hf(out, tmp_path / "back")
    with (
        safe_open(src / "model.safetensors", "pt") as a,
        safe_open(back / "model.safetensors", "pt") as b,
    ):
        assert set(a.keys()) == set(b.keys()) and any(k.startswith("mtp.0.") for k in a.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k

    model, _ = braid.load(back)
    module = model.transformer.mtp[0]
    g = torch.Generator().manual_seed(0)
    h, emb = torch.randn(2, 5, 32, generator=g), torch.randn(2, 5, 32, generator=g)
    eps = 1e-6
    want = F.linear(
        torch.cat(
            [
                F.rms_norm(emb, (32,), hf[f"{mtp}.enorm.weight"], eps),
                F.rms_norm(h, (32,), hf[f"{mtp}.hnorm.weight"], eps),
            ],
            -1,
        ),
        hf[f"{mtp}.eh_proj.weight"],
    )
    got = module.eh_proj(torch.cat([module.hnorm(h), module.enorm(emb)], -1))
    assert (got - want).abs().max().item() < 1e-5


def test_mtp_copies_that_differ_are_refused(tmp_path):
    src = save_braid(BRAID_MODELS["deepseek_v3"] + ["--model.mtp_depth=1"], tmp_path / "b")
    out = export_hf(src, tmp_path / "hf", dtype="fp32")
    sd = load_file(out / "model.safetensors")
    n = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    sd[f"model.layers.{n}.shared_head.head.weight"] += 1
    save_file(sd, out / "model.safetensors")
    from braid.errors import BraidError

    with pytest.raises(BraidError, match="shared_head.head.weight differs"):
        import_hf(out, tmp_path / "back")
    assert not (tmp_path / "back").exists()


QUANTIZED = (
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


def _quantize(w: torch.Tensor, br: int, bc: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    nr, nc = -(-rows // br), -(-cols // bc)
    q, scale = torch.empty(rows, cols, dtype=torch.float8_e4m3fn), torch.empty(nr, nc)
    for i in range(nr):
        for j in range(nc):
            rs, cs = slice(i * br, (i + 1) * br), slice(j * bc, (j + 1) * bc)
            blk = w[rs, cs].float()
            scale[i, j] = blk.abs().max().clamp(min=1e-12) / 448.0
            q[rs, cs] = (blk / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def _dequantize(q: torch.Tensor, scale: torch.Tensor, br: int, bc: int) -> torch.Tensor:
    w = torch.empty(q.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rs, cs = slice(i * br, (i + 1) * br), slice(j * bc, (j + 1) * bc)
            w[rs, cs] = q[rs, cs].float() * scale[i, j]
    return w.to(torch.bfloat16)


# [rows, cols] of a scale block: DeepSeek's square 128x128, scaled down, and a non-square one
# (weight_block_size is [block_n, block_k]: output rows first).
@pytest.mark.parametrize("block", [(8, 8), (4, 8)])
def test_fp8_block_quantized_checkpoint_imports_dequantized(tmp_path, block):
    d = tmp_path / "hf"
    ref = save_hf("deepseek_v3", d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    dequantized = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(d / shard)
        for k in list(tensors):
            if k.endswith(".weight") and k.split(".")[-2] in QUANTIZED:
                q, s = _quantize(tensors[k], *block)
                tensors[k], tensors[f"{k}_scale_inv"] = q, s
                index["weight_map"][f"{k}_scale_inv"] = shard
                dequantized[k] = _dequantize(q, s, *block).float()
        save_file(tensors, d / shard, metadata={"format": "pt"})
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": list(block),
    }
    (d / "config.json").write_text(json.dumps(config))

    out = import_hf(d, tmp_path / "braid")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("blocks.0.attn.wkv_b.weight").dtype == torch.bfloat16
    # The reference: transformers on the dequantized weights, in fp32.
    sd = ref.state_dict()
    with torch.no_grad():
        for k, w in dequantized.items():
            parts = k.split(".")
            if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
                e = int(parts[parts.index("experts") + 1])
                base = ".".join(parts[: parts.index("experts") + 1])
                if parts[-2] == "down_proj":
                    sd[f"{base}.down_proj"][e].copy_(w)
                else:
                    F_ = w.shape[0]
                    half = slice(0, F_) if parts[-2] == "gate_proj" else slice(F_, 2 * F_)
                    sd[f"{base}.gate_up_proj"][e, half].copy_(w)
            else:
                sd[k].copy_(w)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    model, _ = braid.load(out)
    with torch.no_grad():
        assert (ref(ids).logits - model(ids)).abs().max().item() < 1e-4
