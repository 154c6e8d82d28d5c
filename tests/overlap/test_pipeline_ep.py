"""Overlap never changes numerics under expert parallelism (4 gloo ranks, one spawn).

For (dp=1, ep=4) and (dp=2, ep=2), with uneven token counts per rank (one rank has fewer tokens
than chunks, so some of its chunks are empty), routed-only, with a shared expert, and in
capacity mode (equal token counts there: the plain capacity path sizes its exchange from this
rank's own capacity, which needs the same N on every rank): the MoE layer with chunks C in
{1, 2, 3, 4} x split_dw {off, on} (chunks of tokens with their routed dW joined or per chunk)
gives the plain path's output, input grad and every parameter grad (fp32, relative error
< 1e-5), the same bits when run twice, and leaves no weight gradient queued after backward.
"""

from __future__ import annotations

import math

import torch

from harness import run_ranks
from small_moe import seeded_moe

TOL = 1e-5
UNEVEN = [11, 2, 7, 6]  # tokens per rank; rank 1 has fewer tokens than chunks
# (chunks, split_dw, chunk_dw): with 2 experts a rank, C = 3 and 4 cut tokens; their routed
# dW is joined over the chunks (deferred, or at the last chunk's backward) or added per chunk.
SCHEDULES = [(c, s, "auto") for c in (1, 2, 3, 4) for s in (False, True)]
SCHEDULES += [(3, True, "joined"), (4, True, "joined"), (3, True, "per_chunk")]
SCHEDULES += [(3, False, "joined"), (4, False, "joined")]
VARIANTS = {  # shared experts, capacity factor, tokens per rank
    "routed": (0, 0.0, UNEVEN),
    "shared": (1, 0.0, UNEVEN),
    "capacity": (0, 1.0, [8] * 4),
}


def _grads(moe, x, w_out) -> list[torch.Tensor]:
    x = x.clone().requires_grad_()
    y, stats = moe(x)
    ((y * w_out).sum() + stats.aux_loss).backward()
    return [y.detach(), x.grad, stats.num_dropped] + [p.grad.clone() for p in moe.parameters()]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    err = float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) if b.numel() else 0.0
    return err if math.isfinite(err) else math.inf  # NaN never passes


def _worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from braid.exchange.nccl import NcclExchange
    from braid.overlap.engine import LayerOverlap
    from braid.overlap.streams import Clock

    ep4 = dist.new_group([0, 1, 2, 3])
    ep2 = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    layouts = {"dp1_ep4": (ep4, 4, rank), "dp2_ep2": (ep2[rank // 2], 2, rank % 2)}
    gen = torch.Generator().manual_seed(100 + rank)  # fresh data per rank and case
    worst: dict[str, float] = {}
    problems: list[str] = []
    for layout, (group, ep, ep_rank) in layouts.items():
        for variant, (shared, capacity, tokens) in VARIANTS.items():
            base = seeded_moe(
                1,  # identical weights on every rank
                num_experts=8,
                expert_hidden=16,
                num_shared_experts=shared,
                capacity_factor=capacity,
            )
            base.experts.shard(ep_rank, ep)
            base.dispatcher.exchange = NcclExchange(group, dist.group.WORLD)
            x = torch.randn(1, tokens[rank], 16, generator=gen)
            w_out = torch.randn(1, tokens[rank], 16, generator=gen)

            def run(
                chunks, split, dw="auto", base=base, x=x, w_out=w_out, case=f"{layout}/{variant}"
            ):
                moe = _copy(base)
                if chunks is not None:
                    clock = Clock(torch.device("cpu"))
                    moe.overlap = LayerOverlap(0, chunks, split, clock, chunk_dw=dw)
                got = _grads(moe, x, w_out)
                if moe.overlap is not None and len(moe.overlap.queue):
                    problems.append(f"{case}/C={chunks}/split={split}: queue not empty")
                return got

            ref = run(None, False)
            for chunks, split, dw in SCHEDULES:
                first, second = run(chunks, split, dw), run(chunks, split, dw)
                key = f"{layout}/{variant}/C={chunks}/split={split}/{dw}"
                worst[key] = max(_rel(a, b) for a, b in zip(first, ref, strict=True))
                if not all(torch.equal(a, b) for a, b in zip(first, second, strict=True)):
                    problems.append(f"{key}: two runs differ")
    return {"worst": worst, "problems": problems}


def _copy(moe):
    import copy

    exchange = moe.dispatcher.exchange
    moe.dispatcher.exchange = None  # process groups do not deepcopy
    out = copy.deepcopy(moe)
    moe.dispatcher.exchange = out.dispatcher.exchange = exchange
    return out


def test_overlap_schedules_match_plain_path_under_ep4_and_dp2_ep2():
    results = run_ranks(_worker, 4)
    problems = [p for r in results for p in r["problems"]]
    assert not problems, problems
    bad = {}
    for rank, r in enumerate(results):
        for key, err in r["worst"].items():
            if err > TOL:
                bad[f"rank{rank}:{key}"] = err
    assert not bad, f"overlap changed numerics beyond {TOL}: {bad}"
