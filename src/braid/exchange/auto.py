"""`auto`: time the available exchanges at the run's shapes and use the fastest.

`choose_exchange(candidates, ep_group, world_group, cfg, rows, dim, dtype, device)` builds each
candidate (those that cannot run here, e.g. `symmetric` without CUDA, are skipped and logged),
moves `rows` random rows of width `dim` per rank with uniform random splits (the same split
matrix on every rank, from a fixed seed), and returns (name, seconds per movement by name).
Every rank returns the same answer: the row count is agreed with an all-reduce (max) and each
candidate's time is the slowest rank's (all-reduce max), so ties and noise cannot split ranks.

`AutoExchange` (registered as `auto`) makes that choice at its first movement, at that
movement's real payload shape (packed rows when a compressor is on), and then delegates to the
chosen exchange; counts and all-reduces before that go through NCCL, as every exchange's do.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.distributed as dist
from torch import Tensor

from braid.errors import BraidError
from braid.exchange.base import Exchange, Handle
from braid.exchange.config import ExchangeConfig
from braid.exchange.nccl import NcclExchange

log = logging.getLogger(__name__)


def choose_exchange(
    candidates: list[str],
    ep_group,
    world_group,
    cfg: ExchangeConfig,
    rows: int,
    dim: int,
    dtype: torch.dtype,
    device: torch.device,
    iters: int = 5,
) -> tuple[str, dict[str, float]]:
    """The fastest candidate at this payload shape and every candidate's time (s per movement;
    inf where it cannot run here); identical on every rank of `world_group`."""
    from braid.exchange import EXCHANGES, get_exchange

    get_exchange("nccl")  # make sure the built-ins are registered
    W, me = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    agreed = torch.tensor([rows], dtype=torch.long, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=world_group)
    rows = int(agreed.item())
    gen = torch.Generator().manual_seed(20240917)
    dest = torch.randint(0, W, (W, rows), generator=gen)
    M = torch.stack([torch.bincount(d, minlength=W) for d in dest]).tolist()
    send, recv = M[me], [M[w][me] for w in range(W)]
    if dtype.is_floating_point:
        x_RD = torch.randn(rows, dim, generator=gen).to(device=device, dtype=dtype)
    else:
        x_RD = torch.zeros(rows, dim, dtype=dtype, device=device)

    times = []
    for name in candidates:
        try:
            ex = EXCHANGES.get(name)(ep_group, world_group, cfg)
        except BraidError as e:
            log.info("exchange auto: skipping %s: %s", name, e)
            times.append(math.inf)
            continue
        times.append(_time_moves(ex, x_RD, send, recv, iters))
        del ex
    t = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=world_group)
    timings = dict(zip(candidates, t.tolist(), strict=True))
    best = min(candidates, key=lambda n: timings[n])  # first of equals, in candidate order
    if math.isinf(timings[best]):
        raise BraidError(
            f"exchange.auto_candidates={candidates} has no exchange that runs here; add nccl"
        )
    if dist.get_rank() == 0:
        shown = ", ".join(f"{n} {1e3 * s:.3f} ms" for n, s in timings.items())
        log.info("exchange auto: chose %s for %d rows x %d %s (%s)", best, rows, dim, dtype, shown)
    return best, timings


def _time_moves(ex: Exchange, x_RD: Tensor, send: list[int], recv: list[int], iters: int) -> float:
    for _ in range(2):  # warm-up: communicators, buffers
        ex.move(x_RD, send, recv).wait()
    _sync(x_RD.device)
    t0 = time.perf_counter()
    for _ in range(iters):
        ex.move(x_RD, send, recv).wait()
    _sync(x_RD.device)
    return (time.perf_counter() - t0) / iters


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class AutoExchange(NcclExchange):
    """Delegates to the exchange `choose_exchange` picks at the first movement."""

    def __init__(self, ep_group, world_group, cfg: ExchangeConfig | None = None):
        super().__init__(ep_group, world_group, cfg)
        self.cfg = cfg if cfg is not None else ExchangeConfig()
        self.chosen: Exchange | None = None
        self.name: str | None = None
        self.timings: dict[str, float] = {}

    def _pick(self, x_RD: Tensor) -> Exchange:
        if self.chosen is None:
            from braid.exchange import EXCHANGES

            dim = math.prod(x_RD.shape[1:])
            self.name, self.timings = choose_exchange(
                self.cfg.auto_candidates,
                self.ep_group,
                self.world_group,
                self.cfg,
                x_RD.shape[0],
                dim,
                x_RD.dtype,
                x_RD.device,
            )
            self.chosen = EXCHANGES.get(self.name)(self.ep_group, self.world_group, self.cfg)
        return self.chosen

    def move(self, x_RD: Tensor, send_splits: list[int], recv_splits: list[int]) -> Handle:
        return self._pick(x_RD).move(x_RD, send_splits, recv_splits)

    def dispatch(self, x_RD: Tensor, send_splits: list[int], recv_splits: list[int]) -> Handle:
        return self._pick(x_RD).dispatch(x_RD, send_splits, recv_splits)

    def combine(self, y_RD: Tensor, send_splits: list[int], recv_splits: list[int]) -> Handle:
        return self._pick(y_RD).combine(y_RD, send_splits, recv_splits)
