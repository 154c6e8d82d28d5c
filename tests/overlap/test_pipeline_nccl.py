"""Chunks of experts on 2 NCCL ranks (one GPU each): every chunk's combine and dispatch-grad is
received in place by the all-to-all into one buffer, on NCCL's stream, and read only after
the compute stream is ordered behind it. Needs 2 GPUs:

    PYTHONPATH=src python -m pytest -q -m gpu tests/overlap/test_pipeline_nccl.py

Checks: `move_into` of uneven splits writes `nccl`'s rows into a buffer's rows (nothing around
them) by the collective itself (there once the movement completes, before `wait()`); the MoE
layer (bf16 autocast, 8 experts over ep=2) with chunks of experts C in {2, 4} x split_dw
{off, on} equals the plain path, and the same bits when run twice.
"""

from __future__ import annotations

import time

import pytest
import torch

from harness import run_ranks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]
TOL = 2e-2  # bf16 GEMMs over differently grouped rows


def _grads(moe, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        y, _ = moe(x)
    y.float().square().sum().backward()
    if moe.overlap is not None:
        moe.overlap.flush()
    return [y.detach().float(), x.grad] + [p.grad.clone() for p in moe.parameters()]


def _worker(rank: int, world: int, device: str = "cuda") -> dict:
    """(gloo ranks with device "cpu" run the same checks, as a dry run of this file.)"""
    import copy

    import torch.distributed as dist

    from braid.exchange.nccl import NcclExchange
    from braid.model.config import ModelConfig
    from braid.moe.config import MoEConfig
    from braid.moe.layer import MoE
    from braid.overlap.engine import LayerOverlap
    from braid.overlap.streams import Clock

    G = dist.group.WORLD
    ex = NcclExchange(G, G)
    problems: list[str] = []

    # 1. move_into: in place, the buffer's rows only.
    gen = torch.Generator().manual_seed(3)
    M = torch.randint(0, 300, (world, world), generator=gen).tolist()
    send, recv = M[rank], [M[w][rank] for w in range(world)]
    x = torch.randn(sum(send), 64, device=device, dtype=torch.bfloat16)
    want = ex.move(x, send, recv).wait()
    buf = torch.full((sum(recv) + 2, 64), 7.0, device=device, dtype=torch.bfloat16)
    h = ex.move_into(x, send, recv, buf[1:-1])
    deadline = time.perf_counter() + 30
    while not h.done() and time.perf_counter() < deadline:
        time.sleep(1e-4)
    early = buf[1:-1].clone()
    got = h.wait()
    if not (h.done() and torch.equal(early, want) and torch.equal(got, want)):
        problems.append("move_into: rows not received in place")
    if buf[0].ne(7).any() or buf[-1].ne(7).any():
        problems.append("move_into: wrote outside its rows")

    # 2. the layer: chunks of experts equal the plain path.
    torch.manual_seed(0)  # the same weights on both ranks
    cfg = MoEConfig(num_experts=8, top_k=2, expert_hidden=256)
    base = MoE(ModelConfig(dim=128), cfg)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.05)
    base.experts.shard(rank, world)
    base = base.to(device)
    x = torch.randn(700 + 300 * rank, 128, device=device)

    def build(chunks, split):
        base.dispatcher.exchange = None  # process groups do not deepcopy
        moe = copy.deepcopy(base)
        moe.dispatcher.exchange = ex
        if chunks:
            clock = Clock(torch.device(device))
            moe.overlap = LayerOverlap(0, chunks, split, clock, chunk_by="experts")
        return moe

    ref = _grads(build(0, False), x)
    worst: dict[str, float] = {}
    for chunks in (2, 4):
        for split in (False, True):
            first, second = (_grads(build(chunks, split), x) for _ in range(2))
            key = f"C={chunks}/split={split}"
            if not all(torch.equal(a, b) for a, b in zip(first, second, strict=True)):
                problems.append(f"{key}: two runs differ")
            worst[key] = max(
                float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
                for a, b in zip(first, ref, strict=True)
            )
    return {"problems": problems, "worst": worst}


def test_chunks_of_experts_receive_in_place_over_nccl():
    results = run_ranks(_worker, 2, backend="nccl")
    problems = [f"rank{r}: {p}" for r, res in enumerate(results) for p in res["problems"]]
    assert not problems, problems
    bad = {
        f"rank{r}:{k}": e
        for r, res in enumerate(results)
        for k, e in res["worst"].items()
        if not e < TOL
    }
    assert not bad, bad
