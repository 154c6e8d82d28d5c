"""train.precision=fp8 from outside (braid.parallel.fp8): which modules switch, fp8_skip
patterns, unchanged parameter names, refused misaligned shapes, validated knobs."""

import pytest
import torch

from braid.config import load_config
from braid.errors import BraidError, ConfigError
from braid.model.fp8_linear import Fp8Linear
from braid.model.transformer import Transformer
from braid.parallel.fp8 import apply_fp8, skipped

SMALL = [
    "--model.dim=32",
    "--model.n_layers=3",
    "--model.n_heads=2",
    "--model.vocab_size=128",
    "--model.ffn_hidden=64",
    "--moe.expert_hidden=16",
    "--moe.num_experts=4",
    "--moe.num_shared_experts=1",
    "--model.tie_embeddings=false",
]


def build(*extra):
    cfg = load_config(None, SMALL + list(extra))
    with torch.device("meta"):
        return Transformer(cfg.model, cfg.moe), cfg


def fp8_modules(model) -> set[str]:
    names = {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    names |= {
        n
        for n, m in model.named_modules()
        if getattr(m, "fp8_stats", None) is not None and not isinstance(m, Fp8Linear) and n
    }
    return names


def test_default_skip_keeps_head_and_router_and_switches_the_rest():
    model, cfg = build()
    keys = list(model.state_dict())
    apply_fp8(model, cfg.train.fp8_skip, torch.device("cpu"))
    assert list(model.state_dict()) == keys  # same parameters, same names
    got = fp8_modules(model)
    assert "output" not in got and not any("router" in n for n in got)
    assert {
        "blocks.0.attn.wq",
        "blocks.0.ffn.w13",
        "blocks.1.ffn.shared.w2",
        "blocks.2.ffn.experts",
    } <= got
    assert all(model.blocks[i].ffn.dispatcher.send_fp8 for i in (1, 2))
    assert type(model.output) is torch.nn.Linear and model.fp8_stats is not None


@pytest.mark.parametrize(
    "skip, off, on",
    [
        (["experts"], "blocks.1.ffn.experts", "blocks.1.ffn.shared.w13"),
        (["attn"], "blocks.2.attn.wo", "blocks.0.ffn.w2"),
        (["blocks.0.*"], "blocks.0.attn.wq", "blocks.1.attn.wq"),
        (["wkv", "shared"], "blocks.1.ffn.shared.w2", "blocks.1.attn.wq"),
    ],
)
def test_skip_patterns(skip, off, on):
    model, _ = build()
    apply_fp8(model, skip, torch.device("cpu"))
    got = fp8_modules(model)
    assert off not in got and on in got
    if skip == ["experts"]:
        assert not model.blocks[1].ffn.dispatcher.send_fp8  # bf16 experts get bf16 rows
    assert skipped("blocks.3.attn.wkv", ["wkv"]) and not skipped("blocks.3.attn.wq", ["wkv"])


def test_cuda_refuses_dims_the_fp8_kernels_cannot_take():
    model, _ = build("--moe.expert_hidden=24")  # 24 is not a multiple of 16
    with pytest.raises(BraidError, match=r"blocks.1.ffn.experts has dims \(32, 24\).*fp8_skip"):
        apply_fp8(model, ["router", "tok_emb", "output", "shared"], torch.device("cuda"))


def test_knobs_are_validated():
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(None, ["--train.precision=fp16"])
    with pytest.raises(ConfigError, match="train.fp8_skip"):
        load_config(None, ['--train.fp8_skip=["router", "a b"]'])
    assert load_config(None, []).train.precision == "bf16"


def test_fp8_wgrad_reaches_the_experts():
    model, cfg = build("--train.fp8_wgrad=fp8")
    apply_fp8(model, cfg.train.fp8_skip, torch.device("cpu"), cfg.train.fp8_wgrad == "fp8")
    assert model.blocks[1].ffn.experts.fp8_wgrad and model.blocks[2].ffn.experts.fp8_wgrad
    assert model.blocks[0].attn.wq.fp8_wgrad and model.blocks[1].ffn.shared.w13.fp8_wgrad
    with pytest.raises(ConfigError, match="train.fp8_wgrad"):
        load_config(None, ["--train.fp8_wgrad=e5m2"])


def test_gemv_sized_linears_stay_as_they_are():
    model, cfg = build()
    model.blocks[1].ffn.gate = torch.nn.Linear(32, 1, bias=False, device="meta")
    apply_fp8(model, cfg.train.fp8_skip, torch.device("cuda"))  # no refusal for a 1-wide gate
    assert type(model.blocks[1].ffn.gate) is torch.nn.Linear


def test_gpus_without_fp8_grouped_gemms_are_refused_by_name(monkeypatch):
    model, _ = build()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.version, "hip", None)
    for cap in ((8, 0), (12, 0)):  # Ampere; a consumer Blackwell (no fp8 grouped GEMM either)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=cap: c)
        with pytest.raises(BraidError, match=rf"SM90 or SM100.*A100-SXM4-80GB is SM{cap[0]}0"):
            apply_fp8(model, ["router"], torch.device("cuda"))
    for cap in ((9, 0), (10, 0)):  # Hopper, Blackwell data centre: accepted
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=cap: c)
        apply_fp8(model, ["router"], torch.device("cuda"))
