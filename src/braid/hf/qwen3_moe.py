"""Qwen3-MoE (Qwen3MoeForCausalLM): GQA with an explicit head_dim, RMSNorm on each q and k head
(qk_norm = "head"), no biases, softmax top-k renormalised per `norm_topk_prob`, MoE layers
chosen by decoder_sparse_step / mlp_only_layers, no shared expert. Source of truth:
transformers' models/qwen3_moe/modeling_qwen3_moe.py."""

from __future__ import annotations

from braid.hf.llama import LlamaStyleMoE


class Qwen3Moe(LlamaStyleMoE):
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    experts_keys = ("num_experts", "num_local_experts")
    qk_norm = "head"
    sparse_layers = True
