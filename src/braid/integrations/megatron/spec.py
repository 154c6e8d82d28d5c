"""Megatron-Core layer specs whose MoE MLP is Braid's (`BraidMoEAdapter`).

`get_braid_layer_spec(config, **braid)` takes Megatron's own GPT layer spec (local modules, or
Transformer Engine's with `use_transformer_engine=True`) and swaps its MoE MLP for the adapter;
attention, norms and everything else stay Megatron's. `get_braid_decoder_block_spec` does the
same for every MoE layer of Megatron's decoder-block spec (mixed dense/MoE via moe_layer_freq).
The config is translated at once, so a setting Braid cannot honour is refused here, before a
model is built. Braid's own knobs come as one section each (`exchange=ExchangeConfig(...)`,
`overlap=OverlapConfig(...)`) or as keywords named like their fields (`algorithm="nccl"`,
`compressor="fp8"`, `chunks=2`, `expert_impl="loop"`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
)
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec

from braid.errors import ConfigError
from braid.exchange.config import ExchangeConfig
from braid.integrations.megatron.adapter import BraidMoEAdapter, BraidSettings, SharedExchange
from braid.integrations.megatron.translate import translate
from braid.knobs import check, one_of
from braid.overlap.config import OverlapConfig

_SECTIONS = {"exchange": ExchangeConfig, "overlap": OverlapConfig}


def braid_settings(
    exchange: ExchangeConfig | None = None,
    overlap: OverlapConfig | None = None,
    expert_impl: str = "grouped",
    **knobs: Any,
) -> BraidSettings:
    """Braid's knobs for the adapter from sections and/or field-named keywords, validated."""
    sections = {"exchange": exchange or ExchangeConfig(), "overlap": overlap or OverlapConfig()}
    for key, value in knobs.items():
        owner = next((s for s, cls in _SECTIONS.items() if key in _fields(cls)), None)
        if owner is None:
            valid = sorted({f for cls in _SECTIONS.values() for f in _fields(cls)})
            raise ConfigError(key, value, "unknown Braid knob; expected one of " + ", ".join(valid))
        sections[owner] = dataclasses.replace(sections[owner], **{key: value})
    sections["exchange"].validate()
    ov = sections["overlap"]
    ov.validate()
    # The trainer-side parts of [overlap] need Braid's trainer; Megatron's DDP accumulates
    # grads in autograd hooks that a deferred weight gradient (split_dw) would bypass.
    no_split = 'not under Megatron\'s DDP; use "off"'
    check(ov.split_dw == "off", "overlap.split_dw", ov.split_dw, no_split)
    check(ov.chunks != "auto", "overlap.chunks", ov.chunks, "give a number under Megatron")
    check(not ov.report, "overlap.report", ov.report, "needs Braid's trainer; use False")
    check(ov.trace_step == 0, "overlap.trace_step", ov.trace_step, "needs Braid's trainer; use 0")
    one_of("moe.expert_impl", expert_impl, ("grouped", "loop"))
    return BraidSettings(exchange=sections["exchange"], overlap=ov, expert_impl=expert_impl)


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def braid_mlp_spec(config: Any, **braid: Any) -> ModuleSpec:
    """The MLP spec alone: `BraidMoEAdapter` with its settings and one shared exchange."""
    translate(config)  # refuse early, before any model is built
    settings = braid_settings(**braid)
    return ModuleSpec(
        module=BraidMoEAdapter,
        params={"settings": settings, "exchange": SharedExchange(settings.exchange)},
    )


def _is_moe(mlp: Any) -> bool:
    """Megatron's MoE MLP: a ModuleSpec (0.16) or a functools.partial (0.19) of MoELayer."""
    return getattr(mlp, "module", None) is MoELayer or getattr(mlp, "func", None) is MoELayer


def _swap_mlp(layer_spec: ModuleSpec, mlp: ModuleSpec) -> ModuleSpec:
    sub = layer_spec.submodules
    if not _is_moe(sub.mlp):
        return layer_spec
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(sub, mlp=mlp))


def get_braid_layer_spec(
    config: Any,
    *,
    use_transformer_engine: bool = False,
    normalization: str | None = None,
    **braid: Any,
) -> ModuleSpec:
    """Megatron's GPT layer spec (every layer MoE) with Braid's MoE layer as the MLP."""
    mlp = braid_mlp_spec(config, **braid)
    common = dict(
        num_experts=config.num_moe_experts,
        qk_layernorm=config.qk_layernorm,
        multi_latent_attention=config.multi_latent_attention,
    )
    if use_transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        base = get_gpt_layer_with_transformer_engine_spec(**common)
    else:
        base = get_gpt_layer_local_spec(
            **common, normalization=normalization or config.normalization
        )
    return _swap_mlp(base, mlp)


def get_braid_decoder_block_spec(
    config: Any,
    *,
    use_transformer_engine: bool = False,
    normalization: str | None = None,
    **braid: Any,
) -> Any:
    """Megatron's decoder-block spec (dense and MoE layers per moe_layer_freq) with Braid's MoE
    layer in every MoE position; pass it as GPTModel's transformer_layer_spec."""
    mlp = braid_mlp_spec(config, **braid)
    block = get_gpt_decoder_block_spec(
        config, use_transformer_engine, normalization=normalization or config.normalization
    )
    block.layer_specs = [_swap_mlp(s, mlp) for s in block.layer_specs]
    return block
