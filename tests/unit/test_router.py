"""Router math against hand-computed references: aux loss, z-loss, gates, bias update, capacity."""

import math

import pytest
import torch

from braid.moe.config import MoEConfig
from braid.moe.dispatcher import TokenDispatcher
from braid.moe.router import Router


def _router(**kw) -> Router:
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, **kw})
    r = Router(3, cfg)
    torch.manual_seed(0)
    r.weight.data.normal_()
    return r


def test_aux_loss_matches_switch_formula():
    r = _router()
    x = torch.randn(5, 3)
    out = r(x, lambda t: t)
    logits = x @ r.weight.detach().T
    probs = torch.softmax(logits, -1)
    top = torch.topk(probs, 2, -1).indices
    counts = torch.zeros(4)
    for row in top:
        for e in row:
            counts[e] += 1
    f = counts / counts.sum()
    p_mean = probs.mean(0)
    expected = 4 * float((f * p_mean).sum())
    assert out.aux_loss.item() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(out.counts_E, counts)
    # Renormalised gates: the chosen probabilities divided by their sum.
    g = probs.gather(1, out.topk_idx_NK)
    torch.testing.assert_close(out.gates_NK, g / g.sum(-1, keepdim=True))


def test_z_loss_is_mean_squared_logsumexp():
    r = _router()
    x = torch.randn(7, 3)
    out = r(x, lambda t: t)
    logits = (x @ r.weight.detach().T).double()
    expected = float((torch.logsumexp(logits, -1) ** 2).mean())
    assert out.z_loss.item() == pytest.approx(expected, rel=1e-5)


def test_sigmoid_scores_without_renormalisation_are_raw_sigmoids():
    r = _router(score_func="sigmoid", renormalize=False)
    x = torch.randn(6, 3)
    out = r(x, lambda t: t)
    s = torch.sigmoid(x @ r.weight.detach().T)
    torch.testing.assert_close(out.gates_NK, s.gather(1, out.topk_idx_NK))
    assert torch.equal(out.topk_idx_NK, torch.topk(s, 2, -1).indices.sort(-1).values)


def test_sigmoid_aux_loss_normalises_the_scores_per_token():
    """With sigmoid scores, P_i is the mean of the scores normalised to sum to one per token."""
    r = _router(score_func="sigmoid")
    x = torch.randn(6, 3)
    out = r(x, lambda t: t)
    s = torch.sigmoid(x @ r.weight.detach().T)
    top = torch.topk(s, 2, -1).indices
    counts = torch.zeros(4).index_add_(0, top.flatten(), torch.ones(top.numel()))
    p_mean = (s / s.sum(-1, keepdim=True)).mean(0)
    expected = 4 * float((counts / counts.sum() * p_mean).sum())
    assert out.aux_loss.item() == pytest.approx(expected, rel=1e-6)


def test_global_counts_come_from_the_reduce_seam():
    r = _router()
    x = torch.randn(5, 3)
    out = r(x, lambda t: 3 * t)  # as if three ranks had routed identically
    assert out.counts_E.sum().item() == 3 * 5 * 2
    local = r(x, lambda t: t)
    # f is a fraction, so the loss is unchanged by the uniform scale.
    assert out.aux_loss.item() == pytest.approx(local.aux_loss.item(), rel=1e-6)


def test_bias_update_follows_deepseek_v3_sign_rule_and_steers_choice():
    r = _router(bias_balance=True, bias_update_rate=0.1)
    r.record_load(torch.tensor([10.0, 2.0, 4.0, 4.0]))  # mean 5
    r.update_bias()
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    assert r.load_acc.sum() == 0
    # A large bias forces the choice but never changes the gate values.
    r.expert_bias.copy_(torch.tensor([0.0, 0.0, 100.0, 100.0]))
    x = torch.randn(8, 3)
    out = r(x, lambda t: t)
    assert (out.topk_idx_NK == torch.tensor([2, 3])).all()
    probs = torch.softmax(x @ r.weight.detach().T, -1)[:, 2:]
    torch.testing.assert_close(out.gates_NK, probs / probs.sum(-1, keepdim=True))


def test_capacity_keeps_the_earliest_tokens_of_each_expert():
    # 6 tokens, top-1, 2 experts, capacity factor 1 -> C = 3 copies per expert.
    d = TokenDispatcher(num_experts=2, top_k=1, capacity_factor=1.0)
    assert d.capacity(6) == 3
    topk = torch.tensor([[0], [0], [0], [0], [1], [0]])
    x = torch.arange(6, dtype=torch.float32)[:, None].repeat(1, 4)
    plan = d.plan(topk)
    assert plan.num_dropped.item() == 2  # tokens 3 and 5 overflow expert 0
    (route,) = plan.routes
    x_RD = d.dispatch(x, route)
    # Only kept copies travel: tokens 0, 1, 2 to expert 0, token 4 to expert 1.
    assert route.counts_L.tolist() == [3, 1]
    torch.testing.assert_close(x_RD, x[[0, 1, 2, 4]])
    # Identity experts: the combined output is the gated input for kept tokens, zero for drops.
    out = d.combine(x_RD, torch.ones(6, 1), route)
    kept = torch.tensor([1, 1, 1, 0, 1, 0], dtype=torch.float32)[:, None]
    torch.testing.assert_close(out, x * kept)


def test_capacity_formula_rounds_up():
    d = TokenDispatcher(num_experts=8, top_k=2, capacity_factor=1.25)
    assert d.capacity(100) == math.ceil(1.25 * 100 * 2 / 8)


def test_router_logits_stay_fp32_under_bf16_autocast():
    """Sigmoid scores under autocast used to come out bf16 (and crash the count scatter)."""
    cfg = MoEConfig(num_experts=8, top_k=2, expert_hidden=16, score_func="sigmoid")
    router = Router(32, cfg)
    torch.nn.init.normal_(router.weight, std=0.1)
    x = torch.randn(20, 32)
    want = router(x, lambda t: t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = router(x.bfloat16(), lambda t: t)
    assert got.counts_E.dtype == torch.float32
    assert torch.equal(got.topk_idx_NK, router(x.bfloat16().float(), lambda t: t).topk_idx_NK)
    assert want.topk_idx_NK.shape == got.topk_idx_NK.shape
