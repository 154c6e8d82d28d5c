"""Layer- and movement-level helpers of `test_exchange_ranks.py` (run inside its spawned ranks):
the compressions and their error bounds, the MoE layer and data, the single-process references,
the expert-parallel run and its comparison, the random split matrices, the in-place completion
check, and the overlap-window check with a late rank 0."""

from __future__ import annotations

import copy
import time

import torch
from simulate import simulate_compression

from braid.exchange.nccl import NcclExchange
from small_moe import seeded_moe

N_PER_RANK, DIM = 24, 32
# Relative (Frobenius) error of the layer's output and of every gradient against the
# uncompressed reference; docs/exchange.md states these. Measured worst (this test): see docs.
LAYER_BOUND = {
    "none": 1e-6,
    "bf16": 1e-2,
    "int8": 3e-2,
    "fp8-row": 1e-1,
    "fp8": 1e-1,
    "int8+combine": 3e-2,
    "fp8+combine": 1e-1,
}
EXACT = 1e-6  # EP vs the same compression simulated in one process
COMPRESSIONS = {  # name -> (compressor, scale_block, compress_combine)
    "none": ("none", 128, False),
    "bf16": ("bf16", 128, False),
    "int8": ("int8", 128, False),
    "fp8-row": ("fp8", 0, False),
    "fp8": ("fp8", 16, False),  # two scale blocks per row of width 32
    "int8+combine": ("int8", 128, True),
    "fp8+combine": ("fp8", 16, True),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _layer_and_data(world: int):
    gen = torch.Generator().manual_seed(7)  # the weights, then the data
    layer = seeded_moe(gen, DIM, num_experts=8, expert_hidden=48)
    x = torch.randn(world * N_PER_RANK, DIM, generator=gen)
    gy = torch.randn(world * N_PER_RANK, DIM, generator=gen)
    return layer, x, gy


def _run(layer, x, gy) -> dict:
    x = x.clone().requires_grad_(True)
    out, _ = layer(x[None])
    (out[0] * gy).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return {"out": out[0].detach(), "x": x.grad, **grads}


def _reference(layer, x, gy, compression: str) -> dict:
    from braid.exchange.config import ExchangeConfig

    name, block, cc = COMPRESSIONS[compression]
    cfg = ExchangeConfig(compressor=name, scale_block=block, compress_combine=cc)
    return _run(simulate_compression(copy.deepcopy(layer), cfg), x, gy)


def _ep(layer, inner, cfg, x, gy, rank: int, world: int) -> dict:
    import torch.distributed as dist

    from braid.exchange.compress import with_compressor

    ep = copy.deepcopy(layer)
    ep.experts.shard(rank, world)
    ep.dispatcher.exchange = with_compressor(inner, cfg)
    mine = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
    res = _run(ep, x[mine], gy[mine])
    dist.all_reduce(res["router.weight"])  # each rank holds its tokens' part
    return res


def _compare(res: dict, ref: dict, rank: int, world: int) -> float:
    L = 8 // world
    mine = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
    errs = [_rel(res["out"], ref["out"][mine]), _rel(res["x"], ref["x"][mine])]
    errs += [_rel(res[n], ref[n][rank * L : (rank + 1) * L]) for n in ("experts.w13", "experts.w2")]
    errs.append(_rel(res["router.weight"], ref["router.weight"]))
    return max(errs)


class SlowExchange(NcclExchange):
    """`nccl` whose every movement starts SLEEP seconds late: a candidate that
    `choose_exchange` must not pick over `nccl`, wherever it is listed (named by dotted path,
    `exchange_conformance:SlowExchange`)."""

    SLEEP = 0.05

    def move(self, x_RD, send_splits, recv_splits):
        time.sleep(self.SLEEP)
        return super().move(x_RD, send_splits, recv_splits)


class _Late:
    """Rank 0's exchange in the window check: every movement starts LATE seconds late, so the
    peers' movements are still in flight when they drain (gloo completes a collective only
    once every rank has joined it); rows, counts and handles are the inner exchange's."""

    LATE = 0.03

    def __init__(self, inner):
        self.inner, self.size, self.rank = inner, inner.size, inner.rank

    def exchange_counts(self, send_counts_WL):
        return self.inner.exchange_counts(send_counts_WL)

    def move(self, x_RD, send_splits, recv_splits):
        time.sleep(self.LATE)
        return self.inner.move(x_RD, send_splits, recv_splits)

    def dispatch(self, x_RD, send_splits, recv_splits):
        time.sleep(self.LATE)
        return self.inner.dispatch(x_RD, send_splits, recv_splits)

    def combine(self, y_RD, send_splits, recv_splits):
        time.sleep(self.LATE)
        return self.inner.combine(y_RD, send_splits, recv_splits)

    def all_reduce_sum(self, t):
        return self.inner.all_reduce_sum(t)


def _overlap_window(layer, ex, x, gy, plain, rank: int, world: int) -> dict:
    """The EP layer under the overlap engine (chunks=2, split_dw, timed) with exchange `ex`:
    how many dW tasks ran inside exchange windows, the timeline's exchange time, and the error
    against the single-process layer."""
    from braid.overlap.engine import LayerOverlap
    from braid.overlap.streams import Clock

    ep = copy.deepcopy(layer)
    ep.experts.shard(rank, world)
    ep.dispatcher.exchange = _Late(ex) if rank == 0 else ex
    ep.overlap = lo = LayerOverlap(0, 2, True, Clock(torch.device("cpu")))
    lo.timeline.timing = True
    mine = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
    res = _run(ep, x[mine], gy[mine])
    row = lo.timeline.summary()
    return {
        "drained": lo.queue.num_drained,
        "exchange_ms": row["exchange_ms"],
        "err": max(_rel(res["out"], plain["out"][mine]), _rel(res["x"], plain["x"][mine])),
    }


IN_PLACE = {"nccl"}  # exchanges whose `move_into` the collective itself writes (no copy)


def _completed(h, into: torch.Tensor) -> torch.Tensor | None:
    """`into` as it is once `h` reports completion, before `wait()` (which a copying default
    needs to fill it); None if it never completes."""
    deadline = time.perf_counter() + 20
    while not h.done():
        if time.perf_counter() > deadline:
            return None
        time.sleep(1e-4)
    return into.clone()


def _split_matrices(world: int) -> list[list[list[int]]]:
    g = torch.Generator().manual_seed(3)
    mats = [torch.randint(0, 9, (world, world), generator=g).tolist() for _ in range(3)]
    sparse = torch.randint(0, 6, (world, world), generator=g)
    sparse[torch.rand(world, world, generator=g) < 0.5] = 0
    sparse[1] = 0  # rank 1 sends nothing
    mats.append(sparse.tolist())
    mats.append([[0] * world for _ in range(world)])  # nothing moves at all
    return mats
