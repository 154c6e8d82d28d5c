"""Causal self-attention with RoPE and grouped-query attention, plus its KV cache.

Options (all off by default, which is the plain block): a head size independent of dim/heads
(Qwen3), RMSNorm on q and k per head (Qwen3) or over the whole projection (OLMoE), biases on
the q/k/v projections (Qwen2), partial rotary and YaRN (rope.py), and a sliding window
(attend.py). Order inside the block, as in those models: project (+ bias), qk-norm, RoPE,
attention, output projection.

Shape legend: B batch, T new tokens, S cached+new tokens, H query heads, K kv heads, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from braid.model.attend import attend
from braid.model.config import ModelConfig
from braid.model.layers import RMSNorm
from braid.model.rope import apply_rope, softmax_scale


@dataclass
class KVCache:
    """Preallocated keys/values for one layer: [B, K, S_max, Dh]; `length` tokens are filled."""

    k: Tensor
    v: Tensor
    length: int = 0


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int = 0):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.attn_head_dim
        self.window, self.qk_norm = window, cfg.qk_norm
        self.sdpa_backend = cfg.sdpa_backend
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.wq = nn.Linear(cfg.dim, q_width, bias=cfg.qkv_bias)
        self.wkv = nn.Linear(cfg.dim, 2 * kv_width, bias=cfg.qkv_bias)
        self.wo = nn.Linear(q_width, cfg.dim, bias=False)
        if cfg.qk_norm != "none":
            per_head = cfg.qk_norm == "head"
            self.q_norm = RMSNorm(self.head_dim if per_head else q_width, cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim if per_head else kv_width, cfg.norm_eps)
        self.scale = softmax_scale(cfg, self.head_dim)

    def forward(self, x_BTD: Tensor, rope_T: Tensor, cache: KVCache | None = None) -> Tensor:
        B, T, _ = x_BTD.shape
        q = self.wq(x_BTD)
        k, v = self.wkv(x_BTD).view(B, T, 2, -1).unbind(2)
        if self.qk_norm == "full":  # OLMoE: over the whole projection, before the head split
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim)
        if self.qk_norm == "head":  # Qwen3: each head over its own Dh
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope_T), apply_rope(k, rope_T)
        # Under autocast a qk-norm may return fp32 next to a bf16 v; flex attention, unlike
        # SDPA, is not cast by autocast and wants one dtype.
        q, k = q.to(v.dtype), k.to(v.dtype)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # -> [B, heads, T, Dh]
        s0 = 0
        if cache is not None:
            s0 = cache.length
            cache.k[:, :, s0 : s0 + T] = k
            cache.v[:, :, s0 : s0 + T] = v
            cache.length = s0 + T
            k, v = cache.k[:, :, : s0 + T], cache.v[:, :, : s0 + T]
        y = attend(q, k, v, scale=self.scale, window=self.window, q_start=s0,
                   backend=self.sdpa_backend)  # fmt: skip
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))

    def new_cache(self, batch: int, max_len: int, like: Tensor) -> KVCache:
        shape = (batch, self.n_kv, max_len, self.head_dim)
        return KVCache(like.new_zeros(shape), like.new_zeros(shape))
