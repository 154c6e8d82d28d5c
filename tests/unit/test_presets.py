"""Presets give their authors' published sizes in `braid info`; the counts (read from the model
built on the meta device) equal a closed-form count written here for every architecture
option; the memory arithmetic of bf16 compute weights and the fitting-layout search."""

import math

import numpy as np
import pytest

from braid.config import load_config
from braid.info import GPU_BYTES, arithmetic, memory_per_gpu, smallest_fitting_layout

# name: (total, digits, active, digits) as published (model cards / papers), in billions.
PUBLISHED = {
    "mixtral-8x7b": (46.7, 1, 12.9, 1),
    "qwen3-30b-a3b": (30.5, 1, 3.3, 1),
    "moonlight": (16, 0, 3, 0),
    "dsv3": (671, 0, 37, 0),
}


def _as_published(x: float, digits: int) -> set[float]:
    """x (billions) written to `digits` decimals, rounded or cut: authors do both (Qwen writes
    3.3B for 3.353B active and DeepSeek 37B for 37.55B; Mixtral 12.9B for 12.88B)."""
    cut = math.floor(x * 10**digits) / 10**digits
    return {round(x, digits), round(cut, digits)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_give_the_published_sizes(name):
    total, td, active, ad = PUBLISHED[name]
    a = arithmetic(load_config(name))
    assert total in _as_published(a.total_params / 1e9, td)
    assert active in _as_published(a.active_params / 1e9, ad)


def test_dsv3_mtp_module_adds_the_published_amount():
    cfg = load_config("dsv3")
    a = arithmetic(cfg)
    # Its own weights (one MoE block, eh_proj, three norms) ...
    assert 11.5e9 < a.mtp_params < 11.7e9
    # ... plus the embedding and head copies the published checkpoint stores: "685B in all".
    assert round((a.total_params + a.mtp_params + a.embedding_params) / 1e9) in (684, 685)


def _closed_form(cfg) -> tuple[int, int, float]:
    """(total, active, train FLOPs/token) from the config alone, for the main model, and the
    FLOPs of the MTP modules too (no windows here)."""
    m, moe = cfg.model, cfg.moe
    D, H = m.dim, m.n_heads
    if m.attention == "mla":
        q_width = H * (m.qk_nope_head_dim + m.qk_rope_head_dim)
        q = D * q_width if m.q_lora_rank == 0 else m.q_lora_rank * (D + q_width)
        attn = q + D * (m.kv_lora_rank + m.qk_rope_head_dim)
        attn += m.kv_lora_rank * H * (m.qk_nope_head_dim + m.v_head_dim) + H * m.v_head_dim * D
        attn_norms = m.q_lora_rank + m.kv_lora_rank
        qk, v = q_width, H * m.v_head_dim
    else:
        hd = m.head_dim or D // H
        qw, kvw = H * hd, m.kv_heads * hd
        attn = 2 * D * qw + 2 * D * kvw
        attn_bias = (qw + 2 * kvw) if m.qkv_bias else 0
        attn_norms = {"none": 0, "head": 2 * hd, "full": qw + kvw}[m.qk_norm] + attn_bias
        qk = v = qw
    norms = 2 * D + attn_norms
    expert = 3 * D * moe.expert_hidden
    shared = 3 * D * (moe.shared_hidden or moe.expert_hidden) * moe.num_shared_experts
    moe_layer = moe.num_experts * D + shared + moe.num_experts * expert
    moe_layer += D if moe.shared_gate else 0
    moe_ids = set(moe.moe_layer_ids(m.n_layers))
    emb, head = m.vocab_size * D, 0 if m.tie_embeddings else m.vocab_size * D
    total, idle = emb + head + D, 0
    layer = []
    for i in range(m.n_layers):
        ffn = moe_layer if i in moe_ids else 3 * D * m.ffn_hidden
        layer.append((attn + ffn, norms, i in moe_ids))
        total += attn + norms + ffn
        idle += (moe.num_experts - moe.top_k) * expert if i in moe_ids else 0
    active = total - idle
    gemm = active - norms * m.n_layers - D - (emb if head else 0)
    last_gemm, _, last_moe = layer[-1]
    last_gemm -= (moe.num_experts - moe.top_k) * expert if last_moe else 0
    mtp_gemm = m.mtp_depth * (2 * D * D + last_gemm + m.vocab_size * D)
    flops = 6.0 * (gemm + mtp_gemm) + 3.0 * cfg.train.seq_len * (qk + v) * (
        m.n_layers + m.mtp_depth
    )
    return total, active, flops


SMALL = [
    "--model.dim=64",
    "--model.n_layers=4",
    "--model.n_heads=4",
    "--model.vocab_size=96",
    "--model.ffn_hidden=80",
    "--model.max_seq_len=64",
    "--train.seq_len=32",
    "--moe.expert_hidden=24",
    "--moe.num_experts=8",
    "--moe.top_k=2",
]
MLA = [
    "--model.attention=mla",
    "--model.kv_lora_rank=16",
    "--model.qk_rope_head_dim=8",
    "--model.qk_nope_head_dim=12",
    "--model.v_head_dim=10",
]


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--model.tie_embeddings=false", "--moe.layers=[0,2]", "--model.n_kv_heads=2"],
        ["--model.head_dim=24", "--model.qk_norm=head", "--model.qkv_bias=true"],
        ["--model.qk_norm=full", "--moe.num_shared_experts=2", "--moe.shared_gate=true"],
        ["--model.mtp_depth=2", "--moe.num_shared_experts=1", "--model.tie_embeddings=false"],
        ["--model.mtp_depth=1", "--moe.layers=[1]"],  # dense MTP block (last layer dense)
        MLA + ["--model.q_lora_rank=0"],
        MLA + ["--model.q_lora_rank=20", "--model.mtp_depth=1", "--moe.n_groups=4"],
    ],
)
def test_info_counts_equal_the_closed_form(extra):
    cfg = load_config(None, SMALL + extra)
    a = arithmetic(cfg)
    total, active, flops = _closed_form(cfg)
    assert (a.total_params, a.active_params) == (total, active)
    assert a.flops_per_token == pytest.approx(flops, rel=1e-12)


@pytest.mark.parametrize("window", [4, 12, 32, 40])
def test_a_windowed_layer_counts_the_keys_its_window_keeps(window):
    """Attention FLOPs go with the mean number of keys a query sees: seq_len / 2 causal (PaLM),
    with a window w the mean of min(t, w) over positions t in [0, seq_len) (continuous, as the
    causal half is); here numerically, layers 0 and 2 of 4 windowed."""
    full = load_config(None, SMALL)
    cfg = load_config(None, SMALL + [f"--model.window={window}", "--model.window_layers=[0,2]"])
    T, m = cfg.train.seq_len, cfg.model
    t = (np.arange(1_000_000) + 0.5) * T / 1_000_000  # midpoints: exact for a piecewise line
    keys = float(np.minimum(t, window).mean())
    per_key = 6.0 * 2 * m.n_heads * m.attn_head_dim  # q.k and p.v, forward and backward
    want = arithmetic(full).flops_per_token - 2 * per_key * (T / 2 - keys)
    assert arithmetic(cfg).flops_per_token == pytest.approx(want, rel=1e-9)


def test_bf16_compute_weights_keep_states_and_shrink_buffers():
    fp32 = load_config("mixtral-8x7b")
    bf16 = load_config("mixtral-8x7b", ["--parallel.param_dtype=bf16"])
    a, b = memory_per_gpu(fp32, 16, 8), memory_per_gpu(bf16, 16, 8)
    assert a.states == b.states  # fp32 master weights, grads and moments: 16 bytes an element
    assert b.buffers == pytest.approx(a.buffers * 10 / 12)  # gathered bf16 weights and grads


def test_smallest_fitting_layout_is_the_fewest_gpus_that_fit():
    cfg = load_config(None, SMALL + ["--model.tie_embeddings=false"])
    budget = memory_per_gpu(cfg, 1, 1).total / 5.5
    world, ep, mem = smallest_fitting_layout(cfg, budget)
    assert mem.total <= budget
    for w in range(1, world):  # brute force: no smaller world fits with any ep
        for e in (d for d in (1, 2, 4, 8) if w % d == 0):
            assert memory_per_gpu(cfg, w, e).total > budget, (w, e)
    assert GPU_BYTES == 80 * 2**30
