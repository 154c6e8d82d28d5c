"""The MoE layer under expert parallelism (ep=2 and ep=4 on 4 gloo ranks) equals one process.

The shared spawn (spawn.py) runs every case under both layouts. Each rank computes the
single-process reference on the whole global batch itself (shapes are tiny) and compares its
part:
  - output rows and input gradient of its own tokens;
  - router and shared-expert gradients summed over all ranks, and the aux/z losses averaged;
  - its experts' gradients summed over its dp peers (the rows of the experts it owns).
Dropless: the reference is the layer on the global batch; the per-rank objective is
f(out_r) + c*(aux_r + z_r), whose sum over ranks is f(out) + c*world*(aux + z) (router.py).
Capacity: drops depend on each rank's micro-batch, so the reference is the layer applied to
each rank's chunk separately (dispatcher.py); the objective is f(out_r) alone.
"""

from __future__ import annotations

import copy

import torch

TOL = 1e-5
COEF = 0.1
N_PER_RANK = 24
CASES = {
    "top2": {},
    "top1_sigmoid": {"top_k": 1, "score_func": "sigmoid", "renormalize": False},
    "shared_expert": {"num_shared_experts": 1},
    "idle_expert": {"route": "idle"},  # expert 3 never receives a token
    "one_rank": {"route": "one_rank"},  # every copy goes to experts 0 and 1 (ep rank 0)
    "capacity": {"capacity_factor": 1.0},  # drops some copies
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _case(spec: dict, world: int, seed: int):
    """Reference layer, the global inputs and targets (identical on every rank)."""
    from braid.model.config import ModelConfig
    from braid.moe.config import MoEConfig
    from braid.moe.layer import MoE

    spec = dict(spec)
    route = spec.pop("route", None)
    mcfg = ModelConfig(dim=16)
    base = {"num_experts": 8, "top_k": 2, "expert_hidden": 8, "aux_loss_coef": COEF}
    cfg = MoEConfig(**{**base, **spec})
    gen = torch.Generator().manual_seed(seed)
    layer = MoE(mcfg, cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    x = torch.randn(world * N_PER_RANK, 16, generator=gen)
    if route is not None:
        x = x.abs() + 0.1  # positive inputs: a constant router row sets that expert's logit
        with torch.no_grad():
            if route == "idle":
                layer.router.weight[3] = -10.0
            else:
                layer.router.weight[:2] = 10.0
    proj = torch.randn(world * N_PER_RANK, 16, generator=gen)
    return layer, cfg, x, proj


def _reference(layer, cfg, x, proj, world: int) -> dict:
    """Outputs and gradients of the single-process layer (per chunk in capacity mode)."""
    layer = copy.deepcopy(layer)
    x = x.clone().requires_grad_(True)
    chunks = [slice(r * N_PER_RANK, (r + 1) * N_PER_RANK) for r in range(world)]
    if cfg.capacity_factor > 0:
        outs = []
        for c in chunks:
            out, _ = layer(x[c][None])
            (out[0] * proj[c]).sum().backward()
            outs.append(out[0].detach())
        out, aux = torch.cat(outs), None
    else:
        out, stats = layer(x[None])
        out = out[0]
        loss = (out * proj).sum() + COEF * world * (stats.aux_loss + stats.z_loss)
        loss.backward()
        out, aux = out.detach(), (stats.aux_loss.detach(), stats.z_loss.detach())
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return {"out": out, "x_grad": x.grad, "aux": aux, "grads": grads}


def _ep_errors(rank: int, world: int, ctx, spec: dict, seed: int) -> dict:
    import torch.distributed as dist

    from braid.config import load_config
    from braid.parallel.expert import apply_expert_parallel

    layer, cfg, x, proj = _case(spec, world, seed)
    ref = _reference(layer, cfg, x, proj, world)
    ep_layer = torch.nn.ModuleDict({"moe": copy.deepcopy(layer)})
    apply_expert_parallel(ep_layer, load_config(None, []), ctx)
    moe = ep_layer["moe"]
    mine = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
    x_r = x[mine].clone().requires_grad_(True)
    out, stats = moe(x_r[None])
    out = out[0]
    loss = (out * proj[mine]).sum()
    if cfg.capacity_factor == 0:
        loss = loss + COEF * (stats.aux_loss + stats.z_loss)
    loss.backward()

    errors = {
        "out": _rel(out.detach(), ref["out"][mine]),
        "x_grad": _rel(x_r.grad, ref["x_grad"][mine]),
    }
    if ref["aux"] is not None:
        mine_aux = (stats.aux_loss, stats.z_loss)
        for name, mine_v, ref_v in zip(("aux", "z"), mine_aux, ref["aux"], strict=True):
            v = mine_v.detach().clone()
            dist.all_reduce(v)
            errors[name] = _rel(v / world, ref_v)
    L, lo = moe.experts.num_experts, moe.experts.expert_offset
    dp_group = ctx.mesh["dp"].get_group()
    for name, p in moe.named_parameters():
        g = p.grad
        if hasattr(g, "to_local"):  # an expert weight: rows of this rank's experts
            g = g.to_local().clone()
            dist.all_reduce(g, group=dp_group)
            errors[name] = _rel(g, ref["grads"][name][lo : lo + L])
        else:  # dense (router, shared expert): each rank holds its tokens' part
            g = g.clone()
            dist.all_reduce(g)
            errors[name] = _rel(g, ref["grads"][name])
    # The facts each case is about: global counts per expert and copies dropped on this rank.
    facts = {"counts": stats.counts_E.tolist(), "dropped": int(stats.num_dropped)}
    return {"errors": errors, "facts": facts}


def rank_checks(rank: int, world: int, run_dir: str) -> dict:
    from braid.config import load_config
    from braid.parallel.distributed import init_distributed

    torch.manual_seed(0)
    results = {}
    for ep in (2, 4):
        ctx = init_distributed(load_config(None, [f"--parallel.ep={ep}"]))
        for i, (name, spec) in enumerate(CASES.items()):
            results[(ep, name)] = _ep_errors(rank, world, ctx, spec, seed=100 + i)
    return results


def test_ep2_and_ep4_match_single_process_outputs_and_grads(four_ranks):
    per_rank = [r["layer"] for r in four_ranks[0]]
    for ep in (2, 4):  # the cases test what they claim to
        assert per_rank[0][(ep, "idle_expert")]["facts"]["counts"][3] == 0
        assert sum(per_rank[0][(ep, "one_rank")]["facts"]["counts"][2:]) == 0
        assert sum(r[(ep, "capacity")]["facts"]["dropped"] for r in per_rank) > 0
    worst: dict[tuple, tuple[str, float]] = {}
    for results in per_rank:
        for key, res in results.items():
            for what, err in res["errors"].items():
                if err > worst.get(key, ("", -1.0))[1]:
                    worst[key] = (what, err)
    for key, (what, err) in sorted(worst.items()):
        print(f"ep={key[0]} {key[1]:>14}: max rel err {err:.2e} ({what})")
    bad = {k: v for k, v in worst.items() if v[1] > TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"
