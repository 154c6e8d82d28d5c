"""Qwen2-MoE (Qwen2MoeForCausalLM): biases on q, k and v (not o), head_dim = dim/heads, softmax
top-k renormalised per `norm_topk_prob`, one shared expert of `shared_expert_intermediate_size`
scaled by sigmoid(x . shared_expert_gate) (Braid: shared_hidden, shared_gate), MoE layers chosen
by decoder_sparse_step / mlp_only_layers. Source of truth: transformers'
models/qwen2_moe/modeling_qwen2_moe.py."""

from __future__ import annotations

from braid.hf.llama import LlamaStyleMoE


class Qwen2Moe(LlamaStyleMoE):
    model_type = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    has_qkv_bias = True
    sparse_layers = True
    shared_key = "shared_expert_intermediate_size"
    window_per_layer = True  # layer_types names the windowed layers
