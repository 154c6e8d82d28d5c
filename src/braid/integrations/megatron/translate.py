"""Megatron-Core `TransformerConfig` -> Braid `MoEConfig`, or a one-line refusal naming the setting.

This file never imports Megatron: it reads the config's attributes by name, so the table below
is the whole contract. Each row is (Megatron setting, what Braid does with it).

Translated:
  num_moe_experts                       -> moe.num_experts (required)
  moe_router_topk                       -> moe.top_k
  moe_ffn_hidden_size                   -> moe.expert_hidden (Megatron's default: ffn_hidden_size)
  moe_router_score_function             -> moe.score_func (softmax | sigmoid)
  moe_router_pre_softmax                -> moe.renormalize: Megatron's softmax routing without
                                           pre-softmax takes the softmax of the top-k logits, which
                                           is the full softmax's top-k renormalised; with it, the
                                           top-k of the full softmax, not renormalised. Sigmoid
                                           gates are renormalised when top_k > 1 (as Megatron does)
  moe_router_load_balancing_type        -> "aux_loss": moe.aux_loss_coef = moe_aux_loss_coeff;
                                           "none": 0 (a list may hold only these two)
  moe_z_loss_coeff                      -> moe.z_loss_coef (None -> 0)
  moe_router_enable_expert_bias         -> moe.bias_balance (Megatron's finalize_model_grads
  moe_router_bias_update_rate           -> moe.bias_update_rate  updates the bias, as for its own)
  moe_expert_capacity_factor            -> moe.capacity_factor (None -> 0, dropless), the same
                                           capacity ceil(cf*N*K/E); needs moe_token_drop_policy=
                                           "position". Which tokens drop may differ: Braid keeps
                                           each expert's earliest (Switch), Megatron an unordered
                                           top-k of positions. Padding to capacity is implied
  moe_shared_expert_intermediate_size   -> moe.num_shared_experts = 1, moe.shared_hidden
  expert_model_parallel_size            -> must divide num_moe_experts; the group itself comes
                                           from parallel_state at build time
Accepted and left to Braid: moe_token_dispatcher_type and moe_grouped_gemm / moe_permute_fusion
(Braid's exchange and grouped GEMMs replace them), moe_shared_expert_overlap (Braid's overlap
settings decide), moe_router_fusion, moe_router_dtype None/"fp32" (Braid routes in fp32 always),
calculate_per_token_loss (the aux losses are scaled by the tokens, as Megatron's router does).
Everything in `_MUST_BE` and the checks in `translate` is refused: the message names the setting
and the value that would work.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F

from braid.errors import BraidError
from braid.moe.config import MoEConfig


class MegatronConfigError(BraidError):
    """A Megatron `TransformerConfig` setting the Braid adapter cannot honour."""

    def __init__(self, key: str, value: object, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"megatron TransformerConfig.{key}={value!r}: {allowed}")


# Settings that must hold exactly this value (name -> (allowed values, why)).
_MUST_BE: dict[str, tuple[tuple, str]] = {
    "add_bias_linear": ((False,), "Braid's experts have no biases; set add_bias_linear=False"),
    "gated_linear_unit": ((True,), "Braid's experts are SwiGLU; set gated_linear_unit=True"),
    "tensor_model_parallel_size": ((1,), "Braid has no tensor parallelism; use 1"),
    "expert_tensor_parallel_size": ((None, 1), "Braid's experts are not tensor-parallel; use 1"),
    "context_parallel_size": (
        (1,),
        "the aux loss follows Megatron's only without context parallelism; use 1",
    ),
    "moe_router_num_groups": ((None,), "Braid has no group-limited routing; use None"),
    "moe_router_group_topk": ((None,), "Braid has no group-limited routing; use None"),
    "moe_router_topk_limited_devices": (
        (None,),
        "device-limited routing is not in Braid; use None",
    ),
    "moe_router_topk_scaling_factor": ((None, 1.0), "Braid does not scale gates; use None"),
    "moe_input_jitter_eps": ((None,), "Braid's router has no input jitter; use None"),
    "moe_router_force_load_balancing": ((False,), "random routing is not in Braid; use False"),
    "moe_router_dtype": ((None, "fp32"), "Braid routes in fp32; use None or 'fp32'"),
    "moe_shared_expert_gate": ((False,), "Braid's shared expert has no gate; use False"),
    "moe_apply_probs_on_input": ((False,), "Braid weights expert outputs; use False"),
    "moe_latent_size": ((None,), "Braid has no latent MoE projections; use None"),
    "moe_enable_routing_replay": ((False,), "routing replay is not in Braid; use False"),
    "moe_enable_deepep": ((False,), "Braid's exchange replaces the dispatcher; use False"),
    "moe_extended_tp": ((False,), "Braid has no tensor parallelism; use False"),
    "moe_layer_recompute": ((False,), "recompute the MoE layer with recompute_modules=['mlp']"),
    "fp8": ((None,), "Braid's expert GEMMs do not run Megatron's fp8; use None"),
    "fp4": ((None,), "Braid's expert GEMMs do not run Megatron's fp4; use None"),
    "glu_linear_offset": ((0.0,), "Braid's SwiGLU has no offset; use 0.0"),
    "activation_func_clamp_value": ((None,), "Braid's SwiGLU does not clamp; use None"),
    "cuda_graph_impl": (("none",), "the adapter is not CUDA-graph capturable; use 'none'"),
}


def _balance_coef(cfg: Any) -> float:
    """The aux-loss weight from moe_router_load_balancing_type (+ moe_aux_loss_coeff)."""
    kinds, coefs = cfg.moe_router_load_balancing_type, cfg.moe_aux_loss_coeff
    if isinstance(kinds, str):
        kinds, coefs = [kinds], [coefs]
    elif not isinstance(coefs, (list, tuple)):
        coefs = [coefs] * len(kinds)
    total = 0.0
    for kind, coef in zip(kinds, coefs, strict=True):
        if kind not in ("aux_loss", "none"):
            raise MegatronConfigError(
                "moe_router_load_balancing_type",
                cfg.moe_router_load_balancing_type,
                "Braid balances with 'aux_loss' (Switch/GShard) or 'none' (for DeepSeek-V3's "
                "aux-free balancing set moe_router_enable_expert_bias=True)",
            )
        if kind == "aux_loss":
            total += float(coef or 0.0)
    return total


def translate(cfg: Any, ep_size: int | None = None) -> MoEConfig:
    """Braid's MoEConfig for a Megatron TransformerConfig; raises MegatronConfigError (one line,
    naming the setting) for anything Braid would compute differently. `ep_size` defaults to
    cfg.expert_model_parallel_size."""
    E = getattr(cfg, "num_moe_experts", None)
    if not E:
        raise MegatronConfigError("num_moe_experts", E, "set the number of routed experts (> 0)")
    for key, (allowed, why) in _MUST_BE.items():
        value = getattr(cfg, key, allowed[0])  # settings a Megatron version lacks are defaults
        if value not in allowed:
            raise MegatronConfigError(key, value, why)
    if cfg.activation_func is not F.silu:
        raise MegatronConfigError(
            "activation_func", cfg.activation_func, "Braid's experts are SwiGLU; use F.silu"
        )
    if getattr(cfg, "recompute_granularity", None) == "selective" and "moe" in (
        getattr(cfg, "recompute_modules", None) or []
    ):
        raise MegatronConfigError(
            "recompute_modules",
            cfg.recompute_modules,
            "'moe' recomputes Megatron's own layer; use 'mlp' to recompute Braid's",
        )
    score = cfg.moe_router_score_function
    if score not in ("softmax", "sigmoid"):
        raise MegatronConfigError("moe_router_score_function", score, "use softmax or sigmoid")
    k = cfg.moe_router_topk
    renormalize = (not cfg.moe_router_pre_softmax) if score == "softmax" else k > 1
    if cfg.moe_router_enable_expert_bias and score != "sigmoid":
        raise MegatronConfigError(
            "moe_router_enable_expert_bias",
            True,
            "Megatron applies the expert bias to sigmoid scores only; set "
            "moe_router_score_function='sigmoid'",
        )
    cf = cfg.moe_expert_capacity_factor
    if cf is not None and cfg.moe_token_drop_policy != "position":
        raise MegatronConfigError(
            "moe_token_drop_policy",
            cfg.moe_token_drop_policy,
            "with a capacity factor Braid keeps each expert's earliest tokens; use 'position'",
        )
    if cf is not None and cf <= 0:
        raise MegatronConfigError(
            "moe_expert_capacity_factor", cf, "use a positive factor, or None for dropless"
        )
    ep = cfg.expert_model_parallel_size if ep_size is None else ep_size
    if E % ep:
        raise MegatronConfigError(
            "expert_model_parallel_size", ep, f"must divide num_moe_experts={E}"
        )
    shared = cfg.moe_shared_expert_intermediate_size
    moe = MoEConfig(
        num_experts=E,
        top_k=k,
        expert_hidden=cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size,
        layers=[0],  # the spec decides which layers are MoE; this config is per layer
        score_func=score,
        renormalize=renormalize,
        aux_loss_coef=_balance_coef(cfg),
        z_loss_coef=float(cfg.moe_z_loss_coeff or 0.0),
        bias_balance=bool(cfg.moe_router_enable_expert_bias),
        bias_update_rate=float(cfg.moe_router_bias_update_rate),
        capacity_factor=float(cf or 0.0),
        num_shared_experts=1 if shared else 0,
        shared_hidden=shared or 0,
    )
    try:
        moe.validate(n_layers=1)
    except BraidError as e:  # the Megatron name of a value Braid's own check rejected
        raise MegatronConfigError("moe_*", None, str(e)) from None
    return moe
