"""Decoder-only transformer whose feed-forward layers are dense SwiGLU or MoE.

Single-device code: nothing here imports torch.distributed. Parallelism is applied from outside
(`braid.parallel`) by sharding modules and installing an exchange into each MoE dispatcher.

Shape legend: B batch, T time, D dim, V vocab, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from braid.model.attention import Attention, KVCache
from braid.model.config import ModelConfig
from braid.model.layers import RMSNorm, SwiGLU
from braid.model.mla import MLA, LatentCache
from braid.model.mtp import MTPModule
from braid.model.rope import rope_table
from braid.moe.config import MoEConfig
from braid.moe.layer import MoE, MoEStats


@dataclass
class ModelOutput:
    logits: Tensor  # [B, T, V]
    aux_loss: Tensor  # mean over MoE layers (unweighted)
    z_loss: Tensor  # mean over MoE layers (unweighted)
    moe: dict[int, MoEStats] = field(default_factory=dict)  # per MoE layer index
    # Multi-token prediction (training only): depth k's logits [B, T-k, V], for targets y[:, k:].
    mtp_logits: list[Tensor] = field(default_factory=list)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig, is_moe: bool, layer: int = 0):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        attn_cls = MLA if cfg.attention == "mla" else Attention
        self.attn = attn_cls(cfg, window=cfg.window_for(layer))
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoE(cfg, moe_cfg) if is_moe else SwiGLU(cfg.dim, cfg.ffn_hidden)
        self.activation_checkpoint = False

    def forward(
        self, x, rope, cache: KVCache | LatentCache | None = None
    ) -> tuple[Tensor, MoEStats | None]:
        if self.activation_checkpoint and self.training:
            return checkpoint(self._forward, x, rope, None, use_reentrant=False)
        return self._forward(x, rope, cache)

    def _forward(self, x, rope, cache):
        x = x + self.attn(self.attn_norm(x), rope, cache)
        if isinstance(self.ffn, MoE):
            y, stats = self.ffn(self.ffn_norm(x))
            return x + y, stats
        return x + self.ffn(self.ffn_norm(x)), None


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig):
        super().__init__()
        self.cfg, self.moe_cfg = cfg, moe_cfg
        self.moe_layers = moe_cfg.moe_layer_ids(cfg.n_layers)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(
            Block(cfg, moe_cfg, i in self.moe_layers, layer=i) for i in range(cfg.n_layers)
        )
        # MTP modules (DeepSeek-V3): their block is built like the main model's last layer (MoE
        # iff it is, the same attention window). Their MoE layers are numbered n_layers,
        # n_layers+1, ... in `moe_layers`.
        last = cfg.n_layers - 1
        last_is_moe = last in self.moe_layers
        self.mtp = nn.ModuleList(
            MTPModule(cfg.dim, cfg.norm_eps, Block(cfg, moe_cfg, last_is_moe, layer=last))
            for _ in range(cfg.mtp_depth)
        )
        if last_is_moe:
            self.moe_layers = self.moe_layers + [cfg.n_layers + d for d in range(cfg.mtp_depth)]
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("rope", rope_table(cfg), persistent=False)
        if cfg.residual == "compute":  # the norms that read the stream meet it in its dtype
            for norm in self.stream_norms():
                norm.weight_to_input = True

    def forward(
        self,
        idx_BT: Tensor,
        caches: list[KVCache] | list[LatentCache] | None = None,
        start_pos: int = 0,
    ) -> ModelOutput:
        """Logits of the next token; in training (no caches) also the MTP modules' logits."""
        T = idx_BT.shape[1]
        rope = self.rope[start_pos : start_pos + T]
        emb = self._residual(self.tok_emb(idx_BT))
        x = emb
        stats: dict[int, MoEStats] = {}
        for i, block in enumerate(self.blocks):
            x, s = block(x, rope, None if caches is None else caches[i])
            if s is not None:
                stats[i] = s
        logits = self._head(self.norm(x))
        mtp_logits = []
        if self.training and caches is None:  # MTP: training only (generate never runs it)
            h = x
            for k, module in enumerate(self.mtp, start=1):
                if T - k <= 0:
                    break
                h, hn, s = module(h[:, :-1], emb[:, k:], rope[: T - k])
                mtp_logits.append(self._head(hn))
                if s is not None:
                    stats[self.cfg.n_layers + k - 1] = s
        if self.training:
            moes = self.moe_modules()
            for i, s in stats.items():
                moes[i].router.record_load(s.counts_E)
        zero = logits.new_zeros((), dtype=torch.float32)
        aux = torch.stack([s.aux_loss for s in stats.values()]).mean() if stats else zero
        z = torch.stack([s.z_loss for s in stats.values()]).mean() if stats else zero
        return ModelOutput(logits, aux, z, stats, mtp_logits)

    def _residual(self, emb_BTD: Tensor) -> Tensor:
        """The embedding as the residual stream starts: in autocast's dtype with `model.residual
        = "compute"` while autocast is on (the blocks' adds and norms then read and write bf16),
        else as the embedding gives it (fp32 weights: an fp32 stream)."""
        dev = emb_BTD.device.type
        if self.cfg.residual == "compute" and torch.is_autocast_enabled(dev):
            return emb_BTD.to(torch.get_autocast_dtype(dev))
        return emb_BTD

    def _head(self, x_BTD: Tensor) -> Tensor:
        return F.linear(x_BTD, self.tok_emb.weight) if self.output is None else self.output(x_BTD)

    def stream_norms(self) -> list[RMSNorm]:
        """The norms whose input is the residual stream (or the embedding, for MTP)."""
        norms = [n for b in self.all_blocks() for n in (b.attn_norm, b.ffn_norm)]
        norms += [n for m in self.mtp for n in (m.hnorm, m.enorm, m.norm)]
        return [*norms, self.norm]

    def units(self) -> list[nn.Module]:
        """The blocks, then the MTP modules: the units parallelism wraps one by one."""
        return [*self.blocks, *self.mtp]

    def all_blocks(self) -> list[Block]:
        """Every transformer block, the MTP modules' included (activation checkpointing)."""
        return [*self.blocks, *(m.block for m in self.mtp)]

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute non-parameter state (after `to_empty` from the meta device)."""
        self.rope = rope_table(self.cfg).to(self.tok_emb.weight.device)
        for moe in self.moe_modules().values():
            moe.router.expert_bias.zero_()
            moe.router.load_acc.zero_()

    def moe_modules(self) -> dict[int, MoE]:
        """MoE layers by index; those of the MTP modules come after the main model's."""
        blocks = self.all_blocks()
        return {i: blocks[i].ffn for i in self.moe_layers}

    def update_router_biases(self) -> None:
        for moe in self.moe_modules().values():
            moe.router.update_bias()

    def new_caches(self, batch: int, max_len: int) -> list[KVCache] | list[LatentCache]:
        like = self.tok_emb.weight
        return [b.attn.new_cache(batch, max_len, like) for b in self.blocks]
