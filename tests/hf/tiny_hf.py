"""Tiny random Hugging Face MoE checkpoints and Braid model directories for the hf tests.

`save_hf(kind, dir)` builds a transformers model from its config class (nothing downloaded),
redraws every weight so that a misplaced or mis-permuted tensor shows in the logits (norm
weights around 1 +- 0.5, biases +- 0.5, matrices with unit-scale outputs), saves it in small
shards with a byte-level BPE tokenizer.json, and returns the model in eval mode.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

VOCAB = 300
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
# What the two DeepSeek-V3 models share: COMMON with a kv head per head (MLA), a kv LoRA of 16
# and experts of 16.
DEEPSEEK = dict(
    COMMON,
    num_key_value_heads=4,
    intermediate_size=40,
    moe_intermediate_size=16,
    num_experts_per_tok=2,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
)


def hf_config(kind: str):
    import transformers as tf

    if kind == "mixtral":
        return tf.MixtralConfig(
            **COMMON,
            num_hidden_layers=2,
            intermediate_size=24,
            num_local_experts=4,
            num_experts_per_tok=2,
            rope_theta=1e6,
        )
    if kind == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **COMMON,
            num_hidden_layers=3,
            head_dim=16,
            intermediate_size=40,
            moe_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            mlp_only_layers=[1],
            norm_topk_prob=True,
        )
    if kind == "olmoe":
        return tf.OlmoeConfig(
            **COMMON,
            num_hidden_layers=2,
            intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            eos_token_id=0,
        )
    if kind == "qwen2_moe":
        return tf.Qwen2MoeConfig(
            **COMMON,
            num_hidden_layers=3,
            intermediate_size=40,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=2,
            mlp_only_layers=[0],
            norm_topk_prob=False,
        )
    if kind == "mixtral_window":
        return tf.MixtralConfig(
            **COMMON,
            num_hidden_layers=2,
            intermediate_size=24,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=5,
        )
    if kind == "qwen2_moe_window":  # a window on layer 1 only
        return tf.Qwen2MoeConfig(
            **COMMON,
            num_hidden_layers=2,
            intermediate_size=40,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=2,
            use_sliding_window=True,
            sliding_window=5,
            layer_types=["full_attention", "sliding_attention"],
        )
    if kind == "qwen3_moe_yarn":
        yarn = {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
        }
        return tf.Qwen3MoeConfig(
            **COMMON,
            num_hidden_layers=2,
            head_dim=16,
            intermediate_size=40,
            moe_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            rope_parameters=yarn,
        )
    if kind == "deepseek_v3_plain":  # no q LoRA, half-split RoPE, YaRN, no renormalisation
        yarn = {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "mscale": 1.0,
            "mscale_all_dim": 0.8,
            "original_max_position_embeddings": 16,
            "beta_fast": 32,
            "beta_slow": 1,
        }
        return tf.DeepseekV3Config(
            **DEEPSEEK,
            num_hidden_layers=2,
            n_routed_experts=4,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=0,
            q_lora_rank=None,
            v_head_dim=12,
            n_shared_experts=2,
            routed_scaling_factor=1.5,
            norm_topk_prob=False,
            rope_interleave=False,
            rope_parameters=yarn,
        )
    if kind == "deepseek_v3":
        return tf.DeepseekV3Config(
            **DEEPSEEK,
            num_hidden_layers=3,
            n_routed_experts=8,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            q_lora_rank=16,
            v_head_dim=8,
            n_shared_experts=1,
            routed_scaling_factor=2.5,
            num_nextn_predict_layers=0,
        )
    raise KeyError(kind)


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if "norm" in name:
            p.copy_(1 + 0.5 * noise)
        elif name.endswith("bias") or p.dim() == 1:
            p.copy_(0.5 * noise)
        else:
            p.copy_(noise / p.shape[-1] ** 0.5)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def tokenizer_file(path: Path) -> Path:
    from braid.data.tokenizer import train_bpe

    rnd = random.Random(0)
    words = "a mixture of experts routes each token to the best two of eight".split()
    text = [" ".join(rnd.choice(words) for _ in range(50)) for _ in range(40)]
    train_bpe(text, VOCAB).save(str(path))
    return path


def save_hf(kind: str, out: Path, seed: int = 0, dtype=torch.float32, shard="8KB"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(kind)).eval()
    perturb(model, seed)
    model = model.to(dtype)
    model.save_pretrained(out, max_shard_size=shard)
    tokenizer_file(Path(out) / "tokenizer.json")
    return model


BRAID_BASE = [
    "--model.vocab_size=300",
    "--model.dim=32",
    "--model.n_heads=4",
    "--model.n_kv_heads=2",
    "--model.n_layers=3",
    "--model.ffn_hidden=40",
    "--model.max_seq_len=64",
    "--model.tie_embeddings=false",
    "--train.seq_len=32",
    "--moe.num_experts=4",
    "--moe.top_k=2",
    "--moe.expert_hidden=16",
]
# One Braid model per architecture, each with the options that architecture holds.
BRAID_MODELS = {
    "mixtral": ["--moe.first_k_dense=0", "--model.tie_embeddings=true", "--model.window=6"],
    "qwen3_moe": [
        "--model.head_dim=16",
        "--model.qk_norm=head",
        "--moe.layers=[0,2]",
        "--moe.renormalize=false",
    ],
    "olmoe": ["--model.qk_norm=full", "--moe.first_k_dense=0", "--model.rope_theta=500000"],
    "qwen2_moe": [
        "--model.qkv_bias=true",
        "--moe.num_shared_experts=1",
        "--moe.shared_hidden=24",
        "--moe.shared_gate=true",
        "--moe.first_k_dense=1",
    ],
    "deepseek_v3": [
        "--model.attention=mla",
        "--model.q_lora_rank=16",
        "--model.kv_lora_rank=16",
        "--model.qk_rope_head_dim=8",
        "--model.qk_nope_head_dim=8",
        "--model.v_head_dim=12",
        "--model.norm_eps=1e-6",
        "--moe.score_func=sigmoid",
        "--moe.bias_balance=true",
        "--moe.n_groups=2",
        "--moe.topk_groups=1",
        "--moe.routed_scaling=2.5",
        "--moe.num_shared_experts=1",
        "--moe.first_k_dense=1",
        "--model.rope_scaling=yarn",
        "--model.rope_factor=4",
        "--model.rope_original_max_seq_len=16",
        "--model.rope_mscale_all_dim=1",
    ],
}


def save_braid(overrides: list[str], out: Path, seed: int = 0) -> Path:
    """A Braid model directory (as `braid export` writes it) of a randomly drawn model."""
    import json

    from safetensors.torch import save_file

    from braid.checkpoint.load import build_single
    from braid.config import load_config
    from braid.model.init import init_weights

    cfg = load_config(None, BRAID_BASE + overrides)
    model = build_single(cfg, torch.device("cpu"))
    init_weights(model, seed, 0.02, cfg.model.n_layers)
    perturb(model, seed)
    if cfg.moe.bias_balance:  # a routing bias that changes the choice
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name.endswith("expert_bias"):
                    b.copy_(0.3 * torch.randn(b.shape, generator=torch.Generator().manual_seed(1)))
    out.mkdir(parents=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    body = {"fingerprint": cfg.fingerprint(), "config": cfg.to_dict(), "step": 0}
    (out / "config.json").write_text(json.dumps(body))
    tokenizer_file(out / "tokenizer.json")
    return out
