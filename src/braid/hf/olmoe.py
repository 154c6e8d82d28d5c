"""OLMoE (OlmoeForCausalLM): RMSNorm over the whole q and k projections before the head split
(qk_norm = "full"), no biases, an MoE in every layer, softmax top-k renormalised per
`norm_topk_prob` (False in the released models), no shared expert; `clip_qkv` is refused.
Source of truth: transformers' models/olmoe/modeling_olmoe.py."""

from __future__ import annotations

from braid.hf.llama import LlamaStyleMoE


class Olmoe(LlamaStyleMoE):
    model_type = "olmoe"
    architecture = "OlmoeForCausalLM"
    expert_hidden_key = "intermediate_size"
    qk_norm = "full"
