"""SDPA attention (MHA and GQA, with RoPE) equals a naive softmax attention."""

import math

import pytest
import torch

from braid.model.attention import Attention
from braid.model.config import ModelConfig
from braid.model.layers import apply_rope, rope_table


def naive_attention(attn: Attention, x, rope):
    B, T, _ = x.shape
    H, K, Dh = attn.n_heads, attn.n_kv, attn.head_dim
    q = attn.wq(x).view(B, T, H, Dh)
    k, v = attn.wkv(x).view(B, T, 2, K, Dh).unbind(2)
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    k, v = k.repeat_interleave(H // K, dim=2), v.repeat_interleave(H // K, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(Dh)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)
    return attn.wo(out.reshape(B, T, H * Dh))


@pytest.mark.parametrize("kv_heads", [0, 2, 1])
def test_sdpa_attention_equals_naive(kv_heads):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_heads=4, n_kv_heads=kv_heads, max_seq_len=16)
    attn = Attention(cfg)
    rope = rope_table(cfg.attn_head_dim, 16, cfg.rope_theta)[:10]
    assert rope.shape == (10, cfg.attn_head_dim // 2, 2)
    x = torch.randn(2, 10, 32)
    torch.testing.assert_close(attn(x, rope), naive_attention(attn, x, rope), rtol=1e-5, atol=1e-5)


def test_rope_preserves_norm_and_relative_position():
    table = rope_table(8, 32, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    rot = apply_rope(q.expand(1, 32, 1, 8), table)
    torch.testing.assert_close(rot.norm(dim=-1), q.norm(dim=-1).expand(1, 32, 1))
    # <R_m q, R_n k> depends only on m - n.
    rk = apply_rope(k.expand(1, 32, 1, 8), table)
    d1 = (rot[0, 5] * rk[0, 3]).sum()
    d2 = (rot[0, 20] * rk[0, 18]).sum()
    torch.testing.assert_close(d1, d2, rtol=1e-4, atol=1e-5)
