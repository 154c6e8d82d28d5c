"""Mixtral (MixtralForCausalLM): GQA with head_dim = dim/heads, no biases, no q/k norm, an MoE
in every layer (`block_sparse_moe`, experts w1/w3/w2), softmax top-k renormalised, no shared
expert. Source of truth: transformers' models/mixtral/modeling_mixtral.py."""

from __future__ import annotations

from braid.hf.llama import LlamaStyleMoE


class Mixtral(LlamaStyleMoE):
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    experts_keys = ("num_local_experts",)
    expert_hidden_key = "intermediate_size"
    moe_prefix = "block_sparse_moe"
    expert_names = ("w1", "w3", "w2")
    renorm_key = None  # Mixtral always renormalises the top-k gates
    window_per_layer = False  # sliding_window, when set, windows every layer
