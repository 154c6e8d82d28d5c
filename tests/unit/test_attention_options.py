"""GQA attention options (head_dim apart from dim/heads, qk-norm per head and over the whole
width, qkv biases, partial rotary, YaRN, sliding window) against a naive attention written out
here: explicit RMSNorm, a pair-by-pair rotation of the leading dims with frequencies computed
from the RoPE formula, and a masked softmax over all keys."""

import math

import pytest
import torch

from braid.model.attend import flex_window_attention, window_mask
from braid.model.attention import Attention
from braid.model.config import ModelConfig
from braid.model.rope import rope_table, yarn_mscale


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def naive_inv_freq(rot: int, theta: float) -> list[float]:
    return [theta ** (-2 * i / rot) for i in range(rot // 2)]


def rotate(x, pos, inv, cos_scale=1.0):
    """x [B, T, H, Dh]: rotate pair (2i, 2i+1) of token t by pos[t] * inv[i]; the dims after
    the 2 * len(inv) rotated ones are left as they are."""
    out = x.clone()
    for i, f in enumerate(inv):
        ang = pos[None, :, None].double() * f
        c, s = (ang.cos() * cos_scale).float(), (ang.sin() * cos_scale).float()
        a, b = x[..., 2 * i], x[..., 2 * i + 1]
        out[..., 2 * i], out[..., 2 * i + 1] = a * c - b * s, a * s + b * c
    return out


def naive_gqa(attn, cfg, x, inv, *, window=0, scale=None, cos_scale=1.0):
    B, T, _ = x.shape
    H, K, Dh = cfg.n_heads, cfg.kv_heads, cfg.attn_head_dim
    Wk, Wv = attn.wkv.weight.split(K * Dh)
    q = x @ attn.wq.weight.T
    k, v = x @ Wk.T, x @ Wv.T
    if cfg.qkv_bias:
        bk, bv = attn.wkv.bias.split(K * Dh)
        q, k, v = q + attn.wq.bias, k + bk, v + bv
    if cfg.qk_norm == "full":
        q, k = rms(q, attn.q_norm.weight, cfg.norm_eps), rms(k, attn.k_norm.weight, cfg.norm_eps)
    q, k, v = q.view(B, T, H, Dh), k.view(B, T, K, Dh), v.view(B, T, K, Dh)
    if cfg.qk_norm == "head":
        q, k = rms(q, attn.q_norm.weight, cfg.norm_eps), rms(k, attn.k_norm.weight, cfg.norm_eps)
    pos = torch.arange(T)
    q, k = rotate(q, pos, inv, cos_scale), rotate(k, pos, inv, cos_scale)
    scale = scale or 1 / math.sqrt(Dh)
    out = torch.zeros(B, T, H, Dh)
    for h in range(H):
        kv = h // (H // K)  # query head h reads kv head h // group
        for t in range(T):
            keys = [s for s in range(t + 1) if window == 0 or t - s < window]
            sc = torch.einsum("bd,bsd->bs", q[:, t, h], k[:, keys, kv]) * scale
            out[:, t, h] = torch.einsum("bs,bsd->bd", sc.softmax(-1), v[:, keys, kv])
    return out.reshape(B, T, H * Dh) @ attn.wo.weight.T


def randomised(cfg, window=0):
    """An Attention whose norm weights and biases are random too (init makes them 1 and 0)."""
    torch.manual_seed(0)
    attn = Attention(cfg, window=window)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    return attn


CASES = {
    "head_dim_apart": dict(head_dim=12),
    "qk_norm_head": dict(qk_norm="head"),
    "qk_norm_full": dict(qk_norm="full"),
    "qkv_bias": dict(qkv_bias=True),
    "rope_fraction": dict(rope_fraction=0.5),
    "all": dict(head_dim=12, qk_norm="head", qkv_bias=True, rope_fraction=1 / 3, n_kv_heads=1),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("window", [0, 3])
def test_gqa_options_equal_naive_attention(case, window):
    cfg = ModelConfig(**{**dict(dim=32, n_heads=4, n_kv_heads=2, max_seq_len=16), **CASES[case]})
    cfg.validate()
    attn = randomised(cfg, window)
    x = torch.randn(2, 9, 32)
    inv = naive_inv_freq(cfg.rope_dim, cfg.rope_theta)
    got = attn(x, rope_table(cfg)[:9])
    want = naive_gqa(attn, cfg, x, inv, window=window)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_partial_rotary_leaves_the_tail_unrotated():
    cfg = ModelConfig(dim=32, n_heads=4, rope_fraction=0.25, max_seq_len=16)
    assert cfg.rope_dim == 2 and rope_table(cfg).shape == (16, 1, 2)
    from braid.model.rope import apply_rope

    x = torch.randn(1, 16, 1, 8)
    y = apply_rope(x, rope_table(cfg))
    assert torch.equal(y[..., 2:], x[..., 2:]) and not torch.allclose(y[..., :2], x[..., :2])


def yarn_reference(rot, theta, s, orig, beta_fast, beta_slow):
    """YaRN's inverse frequencies (Peng et al. 2023, section 3.2, eqs. 16-18) in DeepSeek-V2's
    discretisation: the boundary dims are where a pair turns beta times over the original
    context, floored/ceiled to whole dims, and the ramp is linear in the dim index."""

    def dim_at(rotations):  # solve orig / (2 pi theta^(2d/rot)) = rotations for d
        return rot * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(dim_at(beta_fast)), 0)
    high = min(math.ceil(dim_at(beta_slow)), rot - 1)
    out = []
    for d in range(rot // 2):
        f = theta ** (-2 * d / rot)
        gamma = min(max((d - low) / ((high - low) or 1e-3), 0.0), 1.0)  # 0 keep, 1 interpolate
        out.append((1 - gamma) * f + gamma * f / s)
    return out, low, high


@pytest.mark.parametrize("rot,theta,s,orig", [(64, 10000.0, 40.0, 4096), (16, 500.0, 4.0, 64)])
def test_yarn_frequencies_and_mscale_follow_the_paper(rot, theta, s, orig):
    from braid.model.rope import inv_freq, rope_cos_scale, softmax_scale

    cfg = ModelConfig(
        dim=rot * 2,
        n_heads=2,
        max_seq_len=8,
        rope_theta=theta,
        rope_scaling="yarn",
        rope_factor=s,
        rope_original_max_seq_len=orig,
        rope_mscale=0.707,
        rope_mscale_all_dim=0.707,
    )
    cfg.validate()
    want, low, high = yarn_reference(rot, theta, s, orig, 32.0, 1.0)
    torch.testing.assert_close(inv_freq(cfg), torch.tensor(want), rtol=1e-6, atol=0)
    # The paper's regimes: pairs turning more than beta_fast times over the original context
    # keep their frequency, those turning fewer than beta_slow times are divided by s.
    for d, f in enumerate(inv_freq(cfg).tolist()):
        turns = orig * theta ** (-2 * d / rot) / (2 * math.pi)
        if turns > 32.0 and d <= low:
            assert f == pytest.approx(theta ** (-2 * d / rot), rel=1e-6)
        if turns < 1.0 and d >= high:
            assert f == pytest.approx(theta ** (-2 * d / rot) / s, rel=1e-6)
    assert yarn_mscale(s, 1.0) == pytest.approx(0.1 * math.log(s) + 1)
    # mscale == mscale_all_dim: the temperature goes wholly into the softmax scale.
    assert rope_cos_scale(cfg) == 1.0
    m = 0.1 * 0.707 * math.log(s) + 1
    assert softmax_scale(cfg, 48) == pytest.approx(m * m / math.sqrt(48))
    plain = ModelConfig(
        dim=rot * 2, n_heads=2, rope_scaling="yarn", rope_factor=s, rope_original_max_seq_len=orig
    )
    assert rope_cos_scale(plain) == pytest.approx(0.1 * math.log(s) + 1)
    assert softmax_scale(plain, 48) is None  # the kernel's 1/sqrt(48)


@pytest.mark.parametrize("mscale_all_dim", [0.0, 1.0])
def test_yarn_attention_equals_naive(mscale_all_dim):
    cfg = ModelConfig(
        dim=32,
        n_heads=4,
        max_seq_len=16,
        rope_scaling="yarn",
        rope_factor=8.0,
        rope_original_max_seq_len=8,
        rope_mscale=1.0,
        rope_mscale_all_dim=mscale_all_dim,
        rope_theta=100.0,
    )
    cfg.validate()
    attn = randomised(cfg)
    x = torch.randn(2, 12, 32)
    inv, _, _ = yarn_reference(8, 100.0, 8.0, 8, 32.0, 1.0)
    m = 0.1 * math.log(8.0) + 1
    cos_scale = 1.0 if mscale_all_dim else m  # m(s, 1) / m(s, mscale_all_dim)
    scale = (m * m if mscale_all_dim else 1.0) / math.sqrt(8)
    want = naive_gqa(attn, cfg, x, inv, scale=scale, cos_scale=cos_scale)
    torch.testing.assert_close(attn(x, rope_table(cfg)[:12]), want, rtol=1e-5, atol=1e-5)


def test_window_mask_and_flex_attention_path():
    """The flex-attention path (used on CUDA, compiled there) gives the masked-SDPA result; run
    here eagerly, which checks its block mask."""
    import warnings

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 10, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 6)
    mask = window_mask(10, 10, 0, 3, torch.device("cpu"))
    assert mask.sum(1).tolist() == [1, 2, 3, 3, 3, 3, 3, 3, 3, 3]
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=True, scale=0.3
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile()"
        got = flex_window_attention(q, k, v, 0.3, 3, compiled=False)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_flex_window_on_cuda_equals_masked_sdpa():
    from braid.model.attend import attend

    torch.manual_seed(0)
    q = torch.randn(2, 8, 512, 64, device="cuda")
    k, v = torch.randn(2, 2, 512, 64, device="cuda"), torch.randn(2, 2, 512, 64, device="cuda")
    got = attend(q, k, v, scale=None, window=100)  # flex attention with a block mask
    mask = window_mask(512, 512, 0, 100, q.device)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)


def test_default_attention_builds_the_plain_block():
    """The defaults build exactly the parameters of the plain block (names, shapes, no bias)."""
    cfg = ModelConfig(dim=32, n_heads=4, n_kv_heads=2)
    shapes = {n: tuple(p.shape) for n, p in Attention(cfg).named_parameters()}
    assert shapes == {"wq.weight": (32, 32), "wkv.weight": (32, 32), "wo.weight": (32, 32)}
    assert cfg.rope_dim == 8 and cfg.window_for(0) == 0
    assert Attention(cfg).scale is None  # SDPA's own 1/sqrt(Dh)


def test_window_patterns():
    cfg = ModelConfig(n_layers=6, window=4, window_every=3)
    assert [cfg.window_for(i) for i in range(6)] == [4, 4, 0, 4, 4, 0]
    cfg = ModelConfig(n_layers=4, window=4, window_layers=[1, 3])
    assert [cfg.window_for(i) for i in range(4)] == [0, 4, 0, 4]
    assert [ModelConfig(window=5).window_for(i) for i in range(4)] == [5] * 4


def test_default_model_parameters_are_unchanged():
    """The plain block's state-dict names and shapes, written out: checkpoints stay loadable."""
    from braid.config import load_config
    from braid.model.transformer import Transformer

    cfg = load_config(None, ["--model.n_layers=2", "--moe.layers=[1]", "--moe.num_experts=4"])
    m = cfg.model
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.moe)
    attn = {n: tuple(p.shape) for n, p in model.named_parameters() if ".attn." in n}
    D, Dh, H, K = m.dim, m.dim // m.n_heads, m.n_heads, m.kv_heads
    want = {}
    for i in range(2):
        want[f"blocks.{i}.attn.wq.weight"] = (H * Dh, D)
        want[f"blocks.{i}.attn.wkv.weight"] = (2 * K * Dh, D)
        want[f"blocks.{i}.attn.wo.weight"] = (D, H * Dh)
    assert attn == want
    # The default RoPE table is the unscaled one over the whole head.
    from braid.model.rope import plain_rope_table

    assert torch.equal(rope_table(m), plain_rope_table(Dh, m.max_seq_len, m.rope_theta))


@pytest.mark.parametrize(
    "override,match",
    [
        (dict(qk_norm="rms"), "model.qk_norm"),
        (dict(window=4, window_layers=[0], window_every=2), "model.window_every"),
        (dict(rope_fraction=0.3), "model.rope_fraction"),
        (dict(rope_scaling="yarn", rope_factor=4.0), "model.rope_original_max_seq_len"),
        (dict(attention="mla", qk_norm="head"), "model.qk_norm"),
        (dict(head_dim=7), "model.head_dim"),
    ],
)
def test_bad_attention_options_are_one_line_errors(override, match):
    from braid.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        ModelConfig(**override).validate()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_windowed_block_on_cuda_trains_like_the_masked_reference(attention):
    """Forward and backward of a windowed attention layer on CUDA (flex attention, also inside
    a compiled module) equal the same layer run through the masked SDPA path on CPU."""
    extra = (
        dict(
            attention="mla",
            kv_lora_rank=64,
            qk_rope_head_dim=32,
            qk_nope_head_dim=64,
            v_head_dim=64,
        )
        if attention == "mla"
        else dict(n_kv_heads=2)
    )
    cfg = ModelConfig(dim=256, n_heads=4, max_seq_len=256, window=48, **extra)
    cfg.validate()
    torch.manual_seed(0)
    from braid.model.mla import MLA

    ref = (MLA if attention == "mla" else Attention)(cfg, window=48)
    x = torch.randn(2, 256, 256, requires_grad=True)
    ref(x, rope_table(cfg)).square().mean().backward()
    for compiled in (False, True):
        gpu = (MLA if attention == "mla" else Attention)(cfg, window=48).cuda()
        gpu.load_state_dict(ref.state_dict())
        xg = x.detach().cuda().requires_grad_()
        fn = torch.compile(gpu) if compiled else gpu
        fn(xg, rope_table(cfg).cuda()).square().mean().backward()
        torch.testing.assert_close(xg.grad.cpu(), x.grad, rtol=1e-3, atol=1e-5)
        for (n, p), (_, q) in zip(gpu.named_parameters(), ref.named_parameters(), strict=True):
            torch.testing.assert_close(p.grad.cpu(), q.grad, rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qk_norm", ["head", "full"])
def test_windowed_qk_norm_under_bf16_autocast_on_cuda(qk_norm):
    """Training dtype on GPU: fp32 weights under bf16 autocast, through flex attention."""
    cfg = ModelConfig(
        dim=256, n_heads=4, n_kv_heads=2, max_seq_len=256, window=48, qk_norm=qk_norm, qkv_bias=True
    )
    torch.manual_seed(0)
    attn = Attention(cfg, window=48).cuda()
    x, rope = torch.randn(2, 256, 256, device="cuda"), rope_table(cfg).cuda()
    ref = attn(x, rope)
    with torch.autocast("cuda", torch.bfloat16):
        y = attn(x, rope)
    y.float().square().mean().backward()
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)
