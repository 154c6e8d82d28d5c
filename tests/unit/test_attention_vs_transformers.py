"""The attention options against the models that define them, as implemented in Hugging Face
transformers (skipped where it is not installed): Qwen3 (head_dim, per-head qk-norm), OLMoE
(qk-norm over the whole width), Qwen2 (qkv biases), StableLM (partial rotary with biases) and
DeepSeek-V3 (MLA with a q LoRA and YaRN, mscale and mscale_all_dim).

Weights are copied across; for the half-split RoPE layout of the GQA models each head's rotated
rows (and per-dim qk-norm weights) are permuted into Braid's interleaved pairs. DeepSeek's MLA
weights are interleaved already and are copied as they are."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from braid.model.attention import Attention  # noqa: E402
from braid.model.config import ModelConfig  # noqa: E402
from braid.model.mla import MLA  # noqa: E402
from braid.model.rope import rope_table  # noqa: E402

T = 20


def interleave(d: int, rot: int | None = None) -> torch.Tensor:
    """Index map half-split -> interleaved over the first `rot` dims of a d-dim head: our dim
    2i is their dim i, our 2i+1 their i + rot/2; dims past rot stay."""
    rot = rot or d
    half = torch.arange(rot // 2)
    return torch.cat([torch.stack([half, half + rot // 2], 1).flatten(), torch.arange(rot, d)])


def per_head(w: torch.Tensor, heads: int, idx: torch.Tensor) -> torch.Tensor:
    d = idx.numel()
    return w.reshape(heads, d, *w.shape[1:])[:, idx].reshape(w.shape)


def randomise(module: torch.nn.Module) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))


def hf_out(att, rotary, x):
    cos, sin = rotary(x, torch.arange(x.shape[1])[None].expand(x.shape[0], -1))
    mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        return att(hidden_states=x, position_embeddings=(cos, sin), attention_mask=mask)[0]


def copy_gqa(att, ours: Attention, cfg: ModelConfig) -> None:
    H, K, d = cfg.n_heads, cfg.kv_heads, cfg.attn_head_dim
    idx = interleave(d, cfg.rope_dim)
    with torch.no_grad():
        ours.wq.weight.copy_(per_head(att.q_proj.weight, H, idx))
        ours.wkv.weight.copy_(torch.cat([per_head(att.k_proj.weight, K, idx), att.v_proj.weight]))
        ours.wo.weight.copy_(att.o_proj.weight)
        if cfg.qkv_bias:
            ours.wq.bias.copy_(per_head(att.q_proj.bias, H, idx))
            ours.wkv.bias.copy_(torch.cat([per_head(att.k_proj.bias, K, idx), att.v_proj.bias]))
        if cfg.qk_norm == "head":
            ours.q_norm.weight.copy_(att.q_norm.weight[idx])
            ours.k_norm.weight.copy_(att.k_norm.weight[idx])
        if cfg.qk_norm == "full":
            ours.q_norm.weight.copy_(per_head(att.q_norm.weight, H, idx))
            ours.k_norm.weight.copy_(per_head(att.k_norm.weight, K, idx))


# The sizes the Qwen3, OLMoE and Qwen2 cases share, in each library's names.
HF_SIZES = dict(hidden_size=48, num_attention_heads=4, rope_theta=1000.0, rms_norm_eps=1e-6)
OUR_SIZES = dict(dim=48, n_heads=4, rope_theta=1000.0, norm_eps=1e-6)


def _qwen3():
    from transformers.models.qwen3 import modeling_qwen3 as m

    hf = transformers.Qwen3Config(**HF_SIZES, num_key_value_heads=2, head_dim=16)
    ours = ModelConfig(**OUR_SIZES, n_kv_heads=2, head_dim=16, qk_norm="head")
    return hf, m.Qwen3Attention, m.Qwen3RotaryEmbedding, ours


def _olmoe():
    from transformers.models.olmoe import modeling_olmoe as m

    hf = transformers.OlmoeConfig(**HF_SIZES, num_key_value_heads=4, clip_qkv=None)
    ours = ModelConfig(**OUR_SIZES, qk_norm="full")
    return hf, m.OlmoeAttention, m.OlmoeRotaryEmbedding, ours


def _qwen2():
    from transformers.models.qwen2 import modeling_qwen2 as m

    hf = transformers.Qwen2Config(**HF_SIZES, num_key_value_heads=2)
    ours = ModelConfig(**OUR_SIZES, n_kv_heads=2, qkv_bias=True)
    return hf, m.Qwen2Attention, m.Qwen2RotaryEmbedding, ours


def _stablelm():
    from transformers.models.stablelm import modeling_stablelm as m

    hf = transformers.StableLmConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        partial_rotary_factor=0.25,
        use_qkv_bias=True,
        rope_theta=1000.0,
    )
    ours = ModelConfig(
        dim=64, n_heads=4, n_kv_heads=2, rope_fraction=0.25, qkv_bias=True, rope_theta=1000.0
    )
    return hf, m.StableLmAttention, m.StableLmRotaryEmbedding, ours


@pytest.mark.parametrize(
    "model", [_qwen3, _olmoe, _qwen2, _stablelm], ids=["qwen3", "olmoe", "qwen2", "stablelm"]
)
def test_gqa_options_equal_the_reference_models(model):
    hf_cfg, att_cls, rot_cls, cfg = model()
    cfg.validate()
    hf_cfg._attn_implementation = "eager"
    att = att_cls(hf_cfg, layer_idx=0).eval()
    randomise(att)
    ours = Attention(cfg)
    copy_gqa(att, ours, cfg)
    x = torch.randn(2, T, cfg.dim)
    want = hf_out(att, rot_cls(hf_cfg), x)
    torch.testing.assert_close(ours(x, rope_table(cfg)[:T]), want, rtol=1e-5, atol=1e-5)


def test_mla_with_yarn_equals_deepseek_v3():
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m

    yarn = {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 16,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }
    # MLA's sizes, under the same names in both libraries
    mla = dict(
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=12,
        v_head_dim=10,
        rope_theta=100.0,
    )
    hf_cfg = transformers.DeepseekV3Config(
        **mla,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        rope_scaling=yarn,
        rope_interleave=True,
        attention_bias=False,
        rms_norm_eps=1e-6,
    )
    hf_cfg._attn_implementation = "eager"
    cfg = ModelConfig(
        **mla,
        dim=64,
        n_heads=4,
        attention="mla",
        max_seq_len=64,
        rope_scaling="yarn",
        rope_factor=4.0,
        rope_original_max_seq_len=16,
        rope_mscale=1.0,
        rope_mscale_all_dim=1.0,
        norm_eps=1e-6,
    )
    cfg.validate()
    att = m.DeepseekV3Attention(hf_cfg, layer_idx=0).eval()
    randomise(att)
    ours = MLA(cfg)
    names = {
        "wq_a": "q_a_proj",
        "q_norm": "q_a_layernorm",
        "wq_b": "q_b_proj",
        "wkv_a": "kv_a_proj_with_mqa",
        "kv_norm": "kv_a_layernorm",
        "wkv_b": "kv_b_proj",
        "wo": "o_proj",
    }
    with torch.no_grad():
        for mine, theirs in names.items():
            getattr(ours, mine).weight.copy_(getattr(att, theirs).weight)
    x = torch.randn(2, 40, 64)  # past the original 16 positions
    want = hf_out(att, m.DeepseekV3RotaryEmbedding(hf_cfg), x)
    torch.testing.assert_close(ours(x, rope_table(cfg)[:40]), want, rtol=1e-5, atol=1e-5)
