"""Multi-head latent attention (DeepSeek-V2, arXiv:2405.04434 section 2.1; used by DeepSeek-V3
and Moonlight), with a cache that holds only the compressed latent and the shared RoPE key.

Per token x (dim D), with r = kv_lora_rank, n = qk_nope_head_dim, p = qk_rope_head_dim,
dv = v_head_dim:
  q        = wq(x), or wq_b(q_norm(wq_a(x))) with a q LoRA of rank q_lora_rank   -> [H, n + p]
  q_nope, q_pe = split(q); q_pe = RoPE(q_pe)
  c, k_pe  = split(wkv_a(x)) -> [r], [p]; c = kv_norm(c); k_pe = RoPE(k_pe), one for all heads
  k_nope, v = split(wkv_b(c)) -> [H, n], [H, dv]
  k        = [k_nope, k_pe]   (k_pe broadcast over heads)
  o        = softmax(q . k * scale) v, scale = 1/sqrt(n + p) (times YaRN's mscale^2), -> wo
Training runs that expanded form through the attention kernel. Decoding runs the
weight-absorbed form (V2 appendix C): with wkv_b = [W_uk; W_uv] per head,
q_nope . (W_uk c) = (W_uk^T q_nope) . c and sum_s a_s W_uv c_s = W_uv (sum_s a_s c_s), so
attention runs over the cached c and k_pe as one shared kv head (multi-query form) and
W_uv is applied after. The cache holds r + p elements per token per layer.

Shape legend: B batch, T new tokens, S cached+new tokens, H heads, R kv_lora_rank,
P qk_rope_head_dim, N qk_nope_head_dim, V v_head_dim, D dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from braid.model.attend import attend
from braid.model.config import ModelConfig
from braid.model.layers import RMSNorm
from braid.model.rope import apply_rope, softmax_scale


@dataclass
class LatentCache:
    """One layer's MLA cache: normalised latents [B, S_max, R] and roped keys [B, S_max, P]."""

    kv: Tensor
    pe: Tensor
    length: int = 0


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int = 0):
        super().__init__()
        self.n_heads, self.window = cfg.n_heads, window
        self.sdpa_backend = cfg.sdpa_backend
        self.rank, self.nope, self.rope = (
            cfg.kv_lora_rank,
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
        )
        self.v_dim = cfg.v_head_dim
        q_width = cfg.n_heads * (self.nope + self.rope)
        if cfg.q_lora_rank > 0:
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, q_width, bias=False)
        else:
            self.wq = nn.Linear(cfg.dim, q_width, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, self.rank + self.rope, bias=False)
        self.kv_norm = RMSNorm(self.rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(self.rank, cfg.n_heads * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.v_dim, cfg.dim, bias=False)
        self.scale = softmax_scale(cfg, self.nope + self.rope)

    def _queries(self, x_BTD: Tensor, rope_T: Tensor) -> tuple[Tensor, Tensor]:
        """q_nope [B, T, H, N] and roped q_pe [B, T, H, P]."""
        B, T, _ = x_BTD.shape
        q = self.wq_b(self.q_norm(self.wq_a(x_BTD))) if hasattr(self, "wq_a") else self.wq(x_BTD)
        q_nope, q_pe = q.view(B, T, self.n_heads, -1).split([self.nope, self.rope], dim=-1)
        return q_nope, apply_rope(q_pe, rope_T)

    def _latent(self, x_BTD: Tensor, rope_T: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised latent c [B, T, R] and the roped shared key k_pe [B, T, P]."""
        c, k_pe = self.wkv_a(x_BTD).split([self.rank, self.rope], dim=-1)
        return self.kv_norm(c), apply_rope(k_pe.unsqueeze(2), rope_T).squeeze(2)

    def forward(self, x_BTD: Tensor, rope_T: Tensor, cache: LatentCache | None = None) -> Tensor:
        if cache is not None:
            return self._forward_cached(x_BTD, rope_T, cache)
        B, T, _ = x_BTD.shape
        q_nope, q_pe = self._queries(x_BTD, rope_T)
        c, k_pe = self._latent(x_BTD, rope_T)
        k_nope, v = self.wkv_b(c).view(B, T, self.n_heads, -1).split([self.nope, self.v_dim], -1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # -> [B, H, T, .]
        y = attend(q, k, v, scale=self.scale, window=self.window, backend=self.sdpa_backend)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))

    def _forward_cached(self, x_BTD: Tensor, rope_T: Tensor, cache: LatentCache) -> Tensor:
        B, T, _ = x_BTD.shape
        q_nope, q_pe = self._queries(x_BTD, rope_T)
        c, k_pe = self._latent(x_BTD, rope_T)
        s0 = cache.length
        cache.kv[:, s0 : s0 + T] = c
        cache.pe[:, s0 : s0 + T] = k_pe
        cache.length = s0 + T
        c_BSR, pe_BSP = cache.kv[:, : s0 + T], cache.pe[:, : s0 + T]
        w_HXR = self.wkv_b.weight.view(self.n_heads, self.nope + self.v_dim, self.rank)
        w_uk_HNR, w_uv_HVR = w_HXR.split([self.nope, self.v_dim], dim=1)
        # Absorb W_uk into the query: q_nope . (W_uk c) = (q_nope W_uk) . c.
        q_lat_BHTR = torch.einsum("bthn,hnr->bhtr", q_nope, w_uk_HNR.to(q_nope.dtype))
        q_BHTX = torch.cat([q_lat_BHTR, q_pe.transpose(1, 2).to(q_lat_BHTR.dtype)], dim=-1)
        k_B1SX = torch.cat([c_BSR, pe_BSP], dim=-1).unsqueeze(1).to(q_BHTX.dtype)
        v_B1SR = c_BSR.unsqueeze(1).to(q_BHTX.dtype)
        scale = self.scale if self.scale is not None else (self.nope + self.rope) ** -0.5
        o_BHTR = attend(
            q_BHTX, k_B1SX, v_B1SR, scale=scale, window=self.window, q_start=s0, flex=False
        )
        # Then W_uv on the attention-weighted latent.
        y_BTHV = torch.einsum("bhtr,hvr->bthv", o_BHTR, w_uv_HVR.to(o_BHTR.dtype))
        return self.wo(y_BTHV.reshape(B, T, -1))

    def new_cache(self, batch: int, max_len: int, like: Tensor) -> LatentCache:
        return LatentCache(
            like.new_zeros(batch, max_len, self.rank), like.new_zeros(batch, max_len, self.rope)
        )
