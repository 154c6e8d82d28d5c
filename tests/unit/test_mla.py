"""Multi-head latent attention against the DeepSeek-V2 formulas (arXiv:2405.04434, eqs. 9-19)
written out per head and per token, without weight absorption; the compressed-cache decoding
against full recomputation; and the KV-cache size that `braid info` reports."""

import math

import pytest
import torch

from braid.config import load_config
from braid.generate import generate
from braid.info import arithmetic, kv_cache_bytes_per_token
from braid.model.config import ModelConfig
from braid.model.init import init_weights
from braid.model.mla import MLA, LatentCache
from braid.model.rope import rope_table
from braid.model.transformer import Transformer

R, P, N, V, H = 12, 4, 6, 5, 3  # kv_lora_rank, rope dim, nope dim, v dim, heads


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate(x, pos, theta):
    """Interleaved RoPE of vector x (last dim P) at integer position pos."""
    out = x.clone()
    for i in range(x.shape[-1] // 2):
        ang = pos * theta ** (-2 * i / x.shape[-1])
        c, s = math.cos(ang), math.sin(ang)
        out[..., 2 * i] = x[..., 2 * i] * c - x[..., 2 * i + 1] * s
        out[..., 2 * i + 1] = x[..., 2 * i] * s + x[..., 2 * i + 1] * c
    return out


def naive_mla(m: MLA, cfg: ModelConfig, x, window=0):
    """Per head i and token t:
    c^KV_t = kv_norm(W^DKV x_t);  k^C_{t,i} = W^UK_i c^KV_t;  v^C_{t,i} = W^UV_i c^KV_t
    k^R_t = RoPE(W^KR x_t)  (one for all heads);  c^Q_t = q_norm(W^DQ x_t) (or x_t)
    q^C_{t,i} = W^UQ_i c^Q_t;  q^R_{t,i} = RoPE(W^QR_i c^Q_t)
    o_{t,i} = sum_s softmax_s((q^C.k^C + q^R.k^R) / sqrt(N + P)) v^C_{s,i};  u_t = W^O [o_t]"""
    B, T, _ = x.shape
    eps, theta = cfg.norm_eps, cfg.rope_theta
    W_dkv, W_kr = m.wkv_a.weight[:R], m.wkv_a.weight[R:]
    if cfg.q_lora_rank:
        W_dq, W_q = m.wq_a.weight, m.wq_b.weight
    else:
        W_q = m.wq.weight
    W_kvb = m.wkv_b.weight
    out = torch.zeros(B, T, H * V)
    for b in range(B):
        c_kv = [rms(W_dkv @ x[b, t], m.kv_norm.weight, eps) for t in range(T)]
        k_r = [rotate(W_kr @ x[b, t], t, theta) for t in range(T)]
        for t in range(T):
            c_q = rms(W_dq @ x[b, t], m.q_norm.weight, eps) if cfg.q_lora_rank else x[b, t]
            for i in range(H):
                W_uq = W_q[i * (N + P) : i * (N + P) + N]
                W_qr = W_q[i * (N + P) + N : (i + 1) * (N + P)]
                W_uk = W_kvb[i * (N + V) : i * (N + V) + N]
                W_uv = W_kvb[i * (N + V) + N : (i + 1) * (N + V)]
                q_c, q_r = W_uq @ c_q, rotate(W_qr @ c_q, t, theta)
                keys = [s for s in range(t + 1) if window == 0 or t - s < window]
                scores = torch.stack(
                    [(q_c @ (W_uk @ c_kv[s]) + q_r @ k_r[s]) / math.sqrt(N + P) for s in keys]
                )
                a = scores.softmax(0)
                o = sum(a[j] * (W_uv @ c_kv[s]) for j, s in enumerate(keys))
                out[b, t, i * V : (i + 1) * V] = o
    return out @ m.wo.weight.T


def mla_cfg(**kw) -> ModelConfig:
    base = dict(
        dim=16,
        n_heads=H,
        attention="mla",
        kv_lora_rank=R,
        qk_rope_head_dim=P,
        qk_nope_head_dim=N,
        v_head_dim=V,
        max_seq_len=16,
        rope_theta=100.0,
    )
    cfg = ModelConfig(**{**base, **kw})
    cfg.validate()
    return cfg


def randomised(cfg, window=0):
    torch.manual_seed(0)
    m = MLA(cfg, window=window)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("q_lora_rank", [0, 8])
@pytest.mark.parametrize("window", [0, 3])
def test_mla_equals_the_formulas(q_lora_rank, window):
    cfg = mla_cfg(q_lora_rank=q_lora_rank)
    m = randomised(cfg, window)
    names = {n for n, _ in m.named_parameters()}
    q_names = {"wq_a.weight", "q_norm.weight", "wq_b.weight"} if q_lora_rank else {"wq.weight"}
    assert names == q_names | {"wkv_a.weight", "kv_norm.weight", "wkv_b.weight", "wo.weight"}
    x = torch.randn(2, 7, 16)
    want = naive_mla(m, cfg, x, window)
    torch.testing.assert_close(m(x, rope_table(cfg)[:7]), want, rtol=1e-5, atol=1e-5)
    # The absorbed form over a compressed cache: prefill 4 tokens, then 3 one by one.
    cache = m.new_cache(2, 16, x)
    table = rope_table(cfg)
    outs = [m(x[:, :4], table[:4], cache)]
    for t in range(4, 7):
        outs.append(m(x[:, t : t + 1], table[t : t + 1], cache))
    torch.testing.assert_close(torch.cat(outs, 1), want, rtol=1e-5, atol=1e-5)
    assert set(vars(cache)) == {"kv", "pe", "length"}
    assert cache.kv.shape == (2, 16, R) and cache.pe.shape == (2, 16, P) and cache.length == 7


def test_mla_yarn_softmax_scale():
    """With mscale_all_dim the softmax scale is m^2 / sqrt(N + P) (DeepSeek-V3)."""
    cfg = mla_cfg(
        rope_scaling="yarn",
        rope_factor=4.0,
        rope_original_max_seq_len=8,
        rope_mscale=1.0,
        rope_mscale_all_dim=1.0,
    )
    mscale = 0.1 * math.log(4.0) + 1
    assert MLA(cfg).scale == pytest.approx(mscale**2 / math.sqrt(N + P))


SMALL = [
    "--model.dim=32",
    "--model.n_layers=3",
    "--model.n_heads=4",
    "--model.vocab_size=128",
    "--model.ffn_hidden=64",
    "--model.max_seq_len=64",
    "--train.seq_len=32",
    "--moe.expert_hidden=32",
    "--moe.num_experts=4",
    "--moe.layers=[1,2]",
]
MLA_OPTS = [
    "--model.attention=mla",
    "--model.q_lora_rank=16",
    "--model.kv_lora_rank=16",
    "--model.qk_rope_head_dim=8",
    "--model.qk_nope_head_dim=8",
    "--model.v_head_dim=12",
]


def built(*extra: str) -> Transformer:
    cfg = load_config(None, SMALL + list(extra))
    m = Transformer(cfg.model, cfg.moe)
    init_weights(m, 0, cfg.model.init_std, cfg.model.n_layers)
    return m.eval()


@pytest.mark.parametrize(
    "extra",
    [
        MLA_OPTS,
        [*MLA_OPTS, "--model.window=4", "--model.window_every=2"],
        ["--model.window=4", "--model.window_layers=[0,2]", "--model.qk_norm=head"],
    ],
    ids=["mla", "mla_window", "gqa_window"],
)
def test_cached_generation_equals_full_recompute(extra):
    torch.manual_seed(0)
    m = built(*extra)
    prompt = torch.randint(0, 128, (2, 5))
    out = generate(m, prompt, 8, temperature=0)
    with torch.no_grad():
        full = m(out[:, :-1]).logits
        assert torch.equal(full[:, 4:].argmax(-1), out[:, 5:])
        caches = m.new_caches(2, 16)
        steps = [m(out[:, :5], caches=caches).logits]
        for t in range(5, out.shape[1] - 1):
            steps.append(m(out[:, t : t + 1], caches=caches, start_pos=t).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    if "--model.attention=mla" in extra:
        assert all(isinstance(c, LatentCache) for c in caches)
        assert caches[0].kv.shape[-1] + caches[0].pe.shape[-1] == 16 + 8


def test_info_counts_mla_and_cache_bytes():
    cfg = load_config(None, SMALL + MLA_OPTS)
    with torch.device("meta"):
        m = Transformer(cfg.model, cfg.moe)
    assert arithmetic(cfg).total_params == sum(p.numel() for p in m.parameters())
    cached, per_head = kv_cache_bytes_per_token(cfg.model, 2)
    assert cached == 2 * (16 + 8)  # latent + rope key, bf16
    held = [sum(t[0, 0].numel() for t in (c.kv, c.pe)) for c in m.new_caches(1, 1)]
    assert held == [cached // 2] * 3  # what generation allocates per token and layer
    assert per_head == 2 * 4 * (8 + 8 + 12)
    gqa = load_config(
        None,
        SMALL
        + [
            "--model.n_kv_heads=2",
            "--model.qkv_bias=true",
            "--model.qk_norm=full",
            "--model.head_dim=12",
        ],
    )
    with torch.device("meta"):
        m = Transformer(gqa.model, gqa.moe)
    assert arithmetic(gqa).total_params == sum(p.numel() for p in m.parameters())
    assert kv_cache_bytes_per_token(gqa.model, 4)[0] == 4 * 2 * 2 * 12
    held = [c.k[0, :, 0].numel() + c.v[0, :, 0].numel() for c in m.new_caches(1, 1)]
    assert held == [2 * 2 * 12] * 3


def test_info_prints_the_cache_line():
    from braid.info import describe

    text = describe(load_config(None, SMALL + MLA_OPTS))
    assert "KV cache / token" in text and "48 B per layer" in text  # (16 + 8) * 2 bytes
