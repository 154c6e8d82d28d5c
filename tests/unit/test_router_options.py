"""Router options against naive references: group-limited top-k (brute force over the allowed
groups), routed_scaling and the gated shared expert (their formulas written out)."""

import itertools

import pytest
import torch

from braid.errors import ConfigError
from braid.model.config import ModelConfig
from braid.moe.config import MoEConfig
from braid.moe.layer import MoE
from braid.moe.router import Router


def _router(dim: int = 5, seed: int = 0, **kw) -> Router:
    r = Router(dim, MoEConfig(**kw))
    gen = torch.Generator().manual_seed(seed)
    r.weight.data.normal_(generator=gen)
    return r


def _brute_force_groups(choice: torch.Tensor, G: int, topk_groups: int, k: int) -> set:
    """One token: the top-k experts among the best topk_groups groups, a group scored by the sum
    of its two best choice scores; by enumerating every set of groups."""
    E = choice.numel()
    size = E // G
    members = [list(range(g * size, (g + 1) * size)) for g in range(G)]
    score = [sum(sorted((float(choice[e]) for e in m), reverse=True)[:2]) for m in members]
    best = max(
        itertools.combinations(range(G), topk_groups), key=lambda gs: sum(score[g] for g in gs)
    )
    allowed = [e for g in best for e in members[g]]
    ranked = sorted(allowed, key=lambda e: float(choice[e]), reverse=True)
    return set(ranked[:k])


@pytest.mark.parametrize(
    "score_func,bias,E,G,TG,K",
    [
        ("sigmoid", True, 16, 4, 2, 4),
        ("sigmoid", False, 12, 6, 3, 3),
        ("softmax", False, 8, 4, 1, 2),
        ("softmax", True, 8, 8, 3, 3),  # one expert per group: the group scores by it alone
    ],
)
def test_group_limited_topk_matches_brute_force(score_func, bias, E, G, TG, K):
    r = _router(
        num_experts=E,
        top_k=K,
        n_groups=G,
        topk_groups=TG,
        score_func=score_func,
        bias_balance=bias,
    )
    if bias:
        r.expert_bias.copy_(torch.randn(E, generator=torch.Generator().manual_seed(1)) * 0.3)
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(2))
    out = r(x, lambda t: t)
    logits = x @ r.weight.detach().T
    scores = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
    choice = scores + r.expert_bias if bias else scores
    size = E // G
    for n in range(x.shape[0]):
        want = _brute_force_groups(choice[n], G, TG, K)
        assert set(out.topk_idx_NK[n].tolist()) == want, n
        # Every chosen expert lies in at most topk_groups groups.
        assert len({e // size for e in want}) <= TG
    # The gates are still the (renormalised) raw scores of the chosen experts, bias excluded.
    g = scores.gather(1, out.topk_idx_NK)
    torch.testing.assert_close(out.gates_NK, g / g.sum(-1, keepdim=True))


def test_group_limit_changes_the_choice_when_it_binds():
    # Without the limit some tokens use experts of more than topk_groups groups.
    kw = dict(num_experts=16, top_k=4, score_func="sigmoid")
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(3))
    plain = _router(**kw)(x, lambda t: t).topk_idx_NK
    limited = _router(**kw, n_groups=8, topk_groups=2)(x, lambda t: t).topk_idx_NK
    assert max(len(set((row // 2).tolist())) for row in plain) > 2
    assert max(len(set((row // 2).tolist())) for row in limited) <= 2
    assert not torch.equal(plain, limited)


@pytest.mark.parametrize("renormalize", [True, False])
def test_routed_scaling_multiplies_the_final_gates(renormalize):
    kw = dict(num_experts=8, top_k=3, score_func="sigmoid", renormalize=renormalize)
    x = torch.randn(10, 5)
    out = _router(**kw, routed_scaling=2.5)(x, lambda t: t)
    r = _router(**kw)
    s = (x @ r.weight.detach().T).sigmoid()
    idx = s.topk(3, -1).indices.sort(-1).values
    g = s.gather(1, idx)
    if renormalize:
        g = g / g.sum(-1, keepdim=True)
    assert torch.equal(out.topk_idx_NK, idx)
    torch.testing.assert_close(out.gates_NK, 2.5 * g)


def test_shared_gate_scales_shared_expert_by_sigmoid_of_a_linear_gate():
    mcfg = ModelConfig(dim=8, n_heads=2)
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden=8, num_shared_experts=1, shared_gate=True)
    torch.manual_seed(0)
    moe = MoE(mcfg, cfg)
    for p in moe.parameters():
        p.data.normal_(0, 0.3)
    assert moe.shared_gate.weight.shape == (1, 8)
    x = torch.randn(2, 5, 8)
    y, _ = moe(x)
    # Naive: routed experts one token at a time + sigmoid(x . w) * shared(x).
    xf = x.reshape(-1, 8)
    r = moe.router(xf, lambda t: t)
    w13, w2 = moe.experts.w13.detach(), moe.experts.w2.detach()
    want = []
    for n in range(xf.shape[0]):
        acc = torch.zeros(8)
        for k in range(2):
            e = int(r.topk_idx_NK[n, k])
            h = xf[n] @ w13[e]  # w13 [E, D, 2F]
            a, b = h.chunk(2)
            z = torch.nn.functional.silu(a) * b
            o = z @ w2[e]  # w2 [E, F, D]
            acc += r.gates_NK[n, k].detach() * o
        sw13, sw2 = moe.shared.w13.weight.detach(), moe.shared.w2.weight.detach()
        a, b = (sw13 @ xf[n]).chunk(2)
        shared = sw2 @ (torch.nn.functional.silu(a) * b)
        gate = torch.sigmoid(moe.shared_gate.weight.detach()[0] @ xf[n])
        want.append(acc + gate * shared)
    torch.testing.assert_close(y.reshape(-1, 8).detach(), torch.stack(want), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert moe.shared_gate.weight.grad is not None and moe.shared_gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kw,key",
    [
        (dict(n_groups=3), "moe.n_groups"),
        (dict(n_groups=4, topk_groups=5), "moe.topk_groups"),
        (dict(n_groups=4, topk_groups=1, top_k=3), "moe.topk_groups"),
        (dict(routed_scaling=0.0), "moe.routed_scaling"),
        (dict(shared_gate=True), "moe.shared_gate"),
    ],
)
def test_bad_router_options_name_the_knob(kw, key):
    with pytest.raises(ConfigError, match=key):
        MoEConfig(**{"num_experts": 8, "top_k": 2, **kw}).validate(4)
