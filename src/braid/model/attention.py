"""Causal self-attention with RoPE and grouped-query attention through SDPA, plus a KV cache.

Shape legend: B batch, T new tokens, S cached+new tokens, H query heads, K kv heads, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from braid.model.config import ModelConfig
from braid.model.layers import apply_rope


@dataclass
class KVCache:
    """Preallocated keys/values for one layer: [B, K, S_max, Dh]; `length` tokens are filled."""

    k: Tensor
    v: Tensor
    length: int = 0


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wkv = nn.Linear(cfg.dim, 2 * cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x_BTD: Tensor, rope_T: Tensor, cache: KVCache | None = None) -> Tensor:
        B, T, _ = x_BTD.shape
        q = self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim)
        k, v = self.wkv(x_BTD).view(B, T, 2, self.n_kv, self.head_dim).unbind(2)
        q, k = apply_rope(q, rope_T), apply_rope(k, rope_T)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # -> [B, heads, T, Dh]
        causal = True
        if cache is not None:
            s0 = cache.length
            cache.k[:, :, s0 : s0 + T] = k
            cache.v[:, :, s0 : s0 + T] = v
            cache.length = s0 + T
            k, v = cache.k[:, :, : s0 + T], cache.v[:, :, : s0 + T]
            if s0 > 0:
                # New queries see every cached key and the new keys up to themselves.
                causal = False
                mask = torch.ones(T, s0 + T, dtype=torch.bool, device=x_BTD.device).tril(s0)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if causal else mask,
            is_causal=causal,
            enable_gqa=self.n_kv != self.n_heads,
        )
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))

    def new_cache(self, batch: int, max_len: int, like: Tensor) -> KVCache:
        shape = (batch, self.n_kv, max_len, self.head_dim)
        return KVCache(like.new_zeros(shape), like.new_zeros(shape))
