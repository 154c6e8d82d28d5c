"""Multi-token prediction (DeepSeek-V3, sec. 2.2) against a hand loop over the depths; it is
trained (gradients reach every MTP parameter), skipped in eval and generation, and checkpointed
as ordinary parameters."""

import pytest
import torch
import torch.nn.functional as F

from braid.config import load_config
from braid.errors import ConfigError
from braid.generate import generate
from braid.model.init import init_weights
from braid.model.transformer import Transformer
from braid.moe.layer import MoE
from braid.train.trainer import loss_fn

SMALL = [
    "--model.dim=32",
    "--model.n_layers=3",
    "--model.n_heads=2",
    "--model.vocab_size=64",
    "--model.ffn_hidden=48",
    "--model.max_seq_len=32",
    "--train.seq_len=12",
    "--moe.expert_hidden=16",
    "--moe.num_experts=4",
    "--moe.num_shared_experts=1",
    "--moe.aux_loss_coef=0.01",
    "--model.mtp_loss_weight=0.3",
]


def _model(*extra: str):
    cfg = load_config(None, SMALL + list(extra))
    m = Transformer(cfg.model, cfg.moe)
    init_weights(m, 0, cfg.model.init_std, cfg.model.n_layers)
    return cfg, m


def _hand_loss(m: Transformer, x, y, cfg) -> torch.Tensor:
    """CE of the main model + lambda/D * sum_k CE_k, each depth written out step by step."""
    T, D = x.shape[1], cfg.model.mtp_depth
    rope = m.rope[:T]
    emb = m.tok_emb(x)
    h = emb
    for b in m.blocks:
        h, _ = b(h, rope)
    logits = F.linear(m.norm(h), m.tok_emb.weight)
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    full = torch.cat([x, y[:, -1:]], dim=1)  # t_0 .. t_T
    mtp = []
    for k in range(1, D + 1):
        mod = m.mtp[k - 1]
        # position i (0 <= i < T-k): h^{k-1}_i and the embedding of t_{i+k}; target t_{i+k+1}
        inp = torch.cat([mod.hnorm(h[:, : T - k]), mod.enorm(m.tok_emb(full[:, k:T]))], -1)
        h, _ = mod.block(mod.eh_proj(inp), rope[: T - k])
        lg = F.linear(mod.norm(h), m.tok_emb.weight)
        tgt = full[:, k + 1 : T + 1]
        nll = -torch.log_softmax(lg, -1).gather(-1, tgt[..., None]).squeeze(-1)
        mtp.append(nll.mean())
    return ce + cfg.model.mtp_loss_weight * sum(mtp) / D, sum(mtp) / D


@pytest.mark.parametrize("depth", [1, 3])
def test_mtp_loss_matches_a_hand_loop_over_depths(depth):
    cfg, m = _model(f"--model.mtp_depth={depth}", "--moe.aux_loss_coef=0", "--moe.z_loss_coef=0")
    m.train()
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 64, (2, 13), generator=g)
    x, y = seq[:, :-1], seq[:, 1:]
    loss, parts = loss_fn(m, x, y, cfg, torch.autocast("cpu", enabled=False))
    want, want_mtp = _hand_loss(m, x, y, cfg)
    torch.testing.assert_close(parts["mtp"], want_mtp.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    loss.backward()
    for name, p in m.named_parameters():
        if name.startswith("mtp."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mtp_block_follows_the_last_layer_and_is_skipped_outside_training():
    _, m = _model("--model.mtp_depth=2")  # last layer MoE (first_k_dense=1)
    assert all(isinstance(mod.block.ffn, MoE) for mod in m.mtp)
    assert m.moe_layers == [1, 2, 3, 4] and set(m.moe_modules()) == {1, 2, 3, 4}
    _, dense = _model("--model.mtp_depth=1", "--moe.layers=[1]")
    assert not isinstance(dense.mtp[0].block.ffn, MoE)
    x = torch.randint(0, 64, (2, 10))
    m.train()
    out = m(x)
    assert [lg.shape[1] for lg in out.mtp_logits] == [9, 8]
    assert set(out.moe) == {1, 2, 3, 4}  # the MTP MoE layers report their router statistics
    m.eval()
    with torch.no_grad():
        assert m(x).mtp_logits == []
        plain = _model()[1].eval()  # same seeds: the main model's weights are the same
        ref = generate(plain, x[:, :4], 5, temperature=0)
        assert torch.equal(generate(m, x[:, :4], 5, temperature=0), ref)
    keys = set(m.state_dict())
    assert {"mtp.0.eh_proj.weight", "mtp.1.block.ffn.router.weight", "mtp.0.enorm.weight"} <= keys


def test_bad_mtp_knobs_name_the_key():
    with pytest.raises(ConfigError, match="model.mtp_depth"):
        load_config(None, ["--model.mtp_depth=-1"])
    with pytest.raises(ConfigError, match="model.mtp_loss_weight"):
        load_config(None, ["--model.mtp_loss_weight=-0.5"])


def test_tiny_mla_mtp_grouped_routing_model_learns():
    """A short version of the CPU run in docs: MLA + MTP + group-limited routing with every
    router option; the held-out loss of a repetitive sequence falls under AdamW."""
    cfg, m = _model(
        "--model.attention=mla",
        "--model.kv_lora_rank=16",
        "--model.qk_rope_head_dim=8",
        "--model.qk_nope_head_dim=8",
        "--model.v_head_dim=8",
        "--model.q_lora_rank=24",
        "--model.mtp_depth=2",
        "--moe.n_groups=2",
        "--moe.topk_groups=1",
        "--moe.score_func=sigmoid",
        "--moe.bias_balance=true",
        "--moe.routed_scaling=2.0",
        "--moe.shared_gate=true",
    )
    g = torch.Generator().manual_seed(0)
    pattern = torch.randint(0, 64, (7,), generator=g)
    seq = pattern.repeat(5)[None, :32].repeat(4, 1)  # period 7: learnable from context
    x, y = seq[:, :-1], seq[:, 1:]
    amp = torch.autocast("cpu", enabled=False)

    def val() -> float:
        m.eval()
        with torch.no_grad():
            return float(F.cross_entropy(m(x).logits.flatten(0, 1), y.flatten()))

    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = val()
    m.train()
    for _ in range(25):
        loss, parts = loss_fn(m, x, y, cfg, amp)
        loss.backward()
        opt.step()
        opt.zero_grad()
        m.update_router_biases()
        m.train()
    assert val() < 0.5 * first
    assert float(parts["mtp"]) < 0.8 * first  # the MTP modules learn too
