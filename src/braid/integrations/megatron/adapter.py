"""`BraidMoEAdapter`: Braid's MoE layer behind Megatron-Core's MLP contract.

Megatron's TransformerLayer builds its MLP as `module(config=TransformerConfig, **params)` and
calls `mlp(hidden_states_SBD, padding_mask=...)`, expecting `(output_SBD, bias)`. The adapter:
  1. translates the TransformerConfig into Braid's MoEConfig (`translate.py`; refusals there);
  2. builds Braid's `MoE` on the meta device, keeps this rank's experts (Megatron's expert-parallel
     group from `parallel_state`), materialises the rest on Megatron's device and dtype, and
     initialises with Megatron's init methods (experts under Megatron's expert-parallel RNG
     fork, so ranks draw different experts, as Megatron's own experts do);
  3. installs ONE exchange per spec (shared by every layer built from it, as `braid.parallel`
     does) over the EP group, with router statistics summed over Megatron's tensor+context
     group (size 1 here), which is the group Megatron's own aux loss counts over;
  4. forward: Braid's MoE on the flattened [S*B, D] tokens (Megatron's token order), then the
     weighted aux and z losses are attached to the output with Megatron's MoEAuxLossAutoScaler
     and logged to Megatron's aux-loss tracker under Megatron's names, so Megatron's training
     loop scales, back-propagates and reports them as it does for its own router.
Expert weights carry `allreduce = (ep == 1)` as Megatron's experts do, so Megatron's DDP
reduces their gradients over the expert-data-parallel group. With aux-free balancing the router
exposes `local_tokens_per_expert` and `expert_bias`, which Megatron's `finalize_model_grads`
all-reduces, updates and zeroes after each step.

Shape legend: S sequence, B micro-batch, D hidden size, E experts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, save_to_aux_losses_tracker
from torch import Tensor

from braid.errors import BraidError
from braid.exchange.base import Exchange, LocalExchange
from braid.exchange.config import ExchangeConfig
from braid.integrations.megatron.translate import translate
from braid.knobs import knob
from braid.model.config import ModelConfig
from braid.moe.layer import MoE
from braid.moe.router import Router
from braid.overlap.config import OverlapConfig


@dataclass(frozen=True, kw_only=True)
class BraidSettings:
    """Braid's own knobs for the adapter: the `[exchange]` and `[overlap]` sections, and the
    expert GEMM implementation (`moe.expert_impl`)."""

    exchange: ExchangeConfig = knob(ExchangeConfig(), "The [exchange] section (EP exchange).")
    overlap: OverlapConfig = knob(OverlapConfig(), "The [overlap] section (chunks only here).")
    expert_impl: str = knob("grouped", "Expert GEMMs: grouped (grouped_mm) or loop.")


class SharedExchange:
    """Builds the EP exchange once for every layer of one spec (held in the spec's params)."""

    def __init__(self, cfg: ExchangeConfig):
        self.cfg = cfg
        self._built: dict[tuple[int, int], Exchange] = {}

    def get(self, ep_group: Any, stats_group: Any) -> Exchange:
        key = (id(ep_group), id(stats_group))
        if key not in self._built:
            if ep_group.size() == 1 and stats_group.size() == 1:
                self._built[key] = LocalExchange()
            else:
                from braid.exchange import get_exchange

                cfg = self.cfg
                if cfg.node_size == 0:  # as braid.parallel does: this node's ranks in the group
                    local = int(os.environ.get("LOCAL_WORLD_SIZE", ep_group.size()))
                    cfg = dataclasses.replace(cfg, node_size=math.gcd(local, ep_group.size()))
                self._built[key] = get_exchange(cfg.algorithm)(ep_group, stats_group, cfg)
        return self._built[key]


class _MegatronRouter(Router):
    """Braid's router under Megatron's names for aux-free balancing state."""

    @property
    def local_tokens_per_expert(self) -> Tensor:
        return self.load_acc


class BraidMoEAdapter(MegatronModule):
    def __init__(
        self,
        config: Any,
        settings: BraidSettings | None = None,
        exchange: SharedExchange | None = None,
        layer_number: int | None = None,
        pg_collection: Any = None,
        **_megatron: Any,  # per-layer extras of newer Megatron versions (is_mtp_layer, name)
    ):
        super().__init__(config)
        settings = settings or BraidSettings()
        self.layer_number = layer_number
        # Megatron >= 0.17 hands every layer its process groups; 0.16 only its own MoELayer.
        ep_group = getattr(pg_collection, "ep", None)
        ep_group = ep_group or parallel_state.get_expert_model_parallel_group()
        stats_group = getattr(pg_collection, "tp_cp", None)
        stats_group = stats_group or parallel_state.get_tensor_and_context_parallel_group()
        ep, ep_rank = ep_group.size(), ep_group.rank()
        self.cfg = dataclasses.replace(translate(config, ep), expert_impl=settings.expert_impl)
        on_gpu = torch.cuda.is_available() and not config.use_cpu_initialization
        device = (
            torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        )

        # 2. meta -> keep this rank's experts -> materialise -> Megatron's init.
        with torch.device("meta"):
            self.moe = MoE(ModelConfig(dim=config.hidden_size), self.cfg)
            self.moe.router = _MegatronRouter(config.hidden_size, self.cfg)
        if ep > 1:
            self.moe.experts.shard(ep_rank, ep)
        self.moe.to_empty(device=device)
        self.moe.to(config.params_dtype)
        self._init_weights(config, on_gpu)
        for p in (self.moe.experts.w13, self.moe.experts.w2):
            p.allreduce = ep == 1  # Megatron's DDP: False -> reduce over expert-data-parallel
        for p in self.moe.router.parameters():
            p.sequence_parallel = config.sequence_parallel

        # 3. the EP exchange (one per spec) and the overlap engine (if any).
        shared = exchange or SharedExchange(settings.exchange)
        self.moe.dispatcher.exchange = shared.get(ep_group, stats_group)
        self.stats_group = stats_group
        ov = settings.overlap  # split_dw, auto, report: refused by the spec (spec.py)
        if ov.chunks != 1:
            from braid.overlap.engine import LayerOverlap
            from braid.overlap.streams import Clock

            # each chunk's routed dW through autograd: Megatron's DDP collects grads in
            # autograd hooks that a joined dW, written into the grads directly, would bypass
            self.moe.overlap = LayerOverlap(
                layer_number or 0, ov.chunks, False, Clock(device), chunk_dw="per_chunk"
            )

    @torch.no_grad()
    def _init_weights(self, config: Any, on_gpu: bool) -> None:
        r = self.moe.router
        r.expert_bias.zero_()
        r.load_acc.zero_()
        self._fp32_router_state()
        if not config.perform_initialization:
            return
        config.init_method(r.weight)
        tracker = tensor_parallel.get_cuda_rng_tracker()
        fork = on_gpu and tracker.is_initialized()
        name = tensor_parallel.random.get_expert_parallel_rng_tracker_name()
        with tracker.fork(name) if fork else contextlib.nullcontext():
            config.init_method(self.moe.experts.w13)
            config.output_layer_init_method(self.moe.experts.w2)
        if self.moe.shared is not None:
            config.init_method(self.moe.shared.w13.weight)
            config.output_layer_init_method(self.moe.shared.w2.weight)

    def _fp32_router_state(self) -> None:
        """Keep the balancing bias and load counts in fp32 (Float16Module casts buffers)."""
        r = self.moe.router
        for name in ("expert_bias", "load_acc"):
            t = getattr(r, name)
            if t.dtype != torch.float32:
                setattr(r, name, t.float())

    def set_layer_number(self, layer_number: int) -> None:
        """Called by Megatron's TransformerLayer: names this layer in the aux-loss tracker."""
        self.layer_number = layer_number

    def forward(
        self, hidden_states_SBD: Tensor, padding_mask: Tensor | None = None, **_: Any
    ) -> tuple[Tensor, None]:
        if padding_mask is not None:
            raise BraidError(
                "padding_mask: Braid's router counts every token in its balancing losses; "
                "pass padding_mask=None to a model built with get_braid_layer_spec"
            )
        self._fp32_router_state()
        out_SBD, stats = self.moe(hidden_states_SBD)
        if self.training and torch.is_grad_enabled():
            self.moe.router.record_load(stats.counts_E)
            out_SBD = self._attach_losses(
                out_SBD, stats, hidden_states_SBD.shape[0] * hidden_states_SBD.shape[1]
            )
        return out_SBD, None

    def _attach_losses(self, out: Tensor, stats: Any, num_tokens: int) -> Tensor:
        """Megatron's router contract: the weighted loss rides on an activation through
        MoEAuxLossAutoScaler (its grad is the main loss's scale), the unweighted value goes to
        the tracker. With calculate_per_token_loss Megatron divides grads by the token count
        later, so the loss is multiplied by it here, as Megatron's router does."""
        c = self.config
        layers = c.num_layers + (c.mtp_num_layers or 0)
        scale = num_tokens if c.calculate_per_token_loss else 1
        loss = out.new_zeros((), dtype=torch.float32)
        if self.cfg.aux_loss_coef > 0:
            loss = loss + self.cfg.aux_loss_coef * stats.aux_loss
            save_to_aux_losses_tracker(
                "load_balancing_loss",
                stats.aux_loss,
                self.layer_number,
                layers,
                reduce_group=self.stats_group,
            )
        if self.cfg.z_loss_coef > 0:
            loss = loss + self.cfg.z_loss_coef * stats.z_loss
            save_to_aux_losses_tracker("z_loss", stats.z_loss, self.layer_number, layers)
        if self.cfg.aux_loss_coef > 0 or self.cfg.z_loss_coef > 0:
            out = MoEAuxLossAutoScaler.apply(out, loss * scale)
        return out
