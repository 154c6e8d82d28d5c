"""`auto`: time the available exchanges at the run's payload shape and use the fastest.

`choose_exchange(candidates, ep_group, world_group, cfg, rows, dim, dtype, device)` builds each
candidate once (those that cannot run here, e.g. `symmetric` without CUDA, are skipped with
their one-line reason), times what a dispatch costs with it: its count exchange (with the host
read the dispatcher does) plus the movement of `rows` random rows of width `dim` per rank with
uniform random splits (the same split matrix on every rank, from a fixed seed), and returns an
`AutoChoice`: the chosen name, every candidate's seconds per movement, the shape, and the
chosen exchange itself, built and warmed up (the other candidates are dropped, so nothing is
built twice). Every rank gets the same answer: the row count is agreed with an all-reduce (max)
and each candidate's time is the slowest rank's (all-reduce max), so noise cannot split ranks.

`AutoExchange` (registered as `auto`) makes that choice once, at its first movement, at that
movement's real payload shape (packed rows when a compressor is on), and then delegates
everything to the chosen exchange; the counts and all-reduces before it go through NCCL, as
every built-in exchange's do. `braid.parallel.expert` installs ONE exchange in every MoE layer,
so this is once per model. In `braid train` the first movement is in the initial validation
(or in the overlap planner's measurement, overlap.chunks=auto or report), before step 1; when a
run resumes from a checkpoint, it is in the first step.

Reporting: `watch(fn)` calls `fn(choice)` once the choice is made (at once if it was). The
`braid.parallel.expert` watcher prints `choice.line()` on rank 0's stderr; the trainer logs
`choice.metrics()` into the metrics store.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from braid.errors import BraidError
from braid.exchange.base import Exchange, Handle, receive_into
from braid.exchange.config import ExchangeConfig
from braid.exchange.nccl import NcclExchange


@dataclass(frozen=True)
class AutoChoice:
    """What `auto` decided, and on what evidence (identical on every rank but `skipped`)."""

    name: str  # the chosen candidate
    seconds: dict[str, float]  # per movement (counts + rows), slowest rank; inf: cannot run
    skipped: dict[str, str]  # candidate -> why it cannot run on this rank
    rows: int  # rows per rank the candidates moved
    dim: int  # elements per row
    dtype: torch.dtype
    exchange: Exchange | None = field(default=None, compare=False, repr=False)

    def line(self) -> str:
        """The console line, e.g. `exchange auto: chose nccl for 96 rows x 32 float32 per rank |
        nccl 0.210 ms | hierarchical 0.340 ms | symmetric skipped (<why>)`."""
        parts = []
        for n, s in self.seconds.items():
            if n in self.skipped:
                parts.append(f"{n} skipped ({self.skipped[n]})")
            elif math.isinf(s):
                parts.append(f"{n} skipped (cannot run on every rank)")
            else:
                parts.append(f"{n} {1e3 * s:.3f} ms")
        dtype = str(self.dtype).removeprefix("torch.")
        shape = f"{self.rows} rows x {self.dim} {dtype} per rank"
        return f"exchange auto: chose {self.name} for {shape} | " + " | ".join(parts)

    def metrics(self) -> dict[str, float]:
        """`exchange/auto_ms/<candidate>` (inf where it cannot run), `exchange/auto_chose/<name>`
        = 1, and the shape, for the metrics store."""
        out = {f"exchange/auto_ms/{n}": 1e3 * s for n, s in self.seconds.items()}
        out[f"exchange/auto_chose/{self.name}"] = 1.0
        out["exchange/auto_rows"] = float(self.rows)
        return out

    def record(self) -> dict:
        """A plain (JSON and pickle friendly) copy, without the exchange object."""
        return {
            "chose": self.name,
            "seconds": dict(self.seconds),
            "skipped": dict(self.skipped),
            "rows": self.rows,
            "dim": self.dim,
            "dtype": str(self.dtype),
        }


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
) -> AutoChoice:
    """The fastest candidate at this payload shape, every candidate's time and the chosen
    exchange object; the same choice on every rank of `world_group` (a collective)."""
    from braid.exchange import EXCHANGES

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

    built: dict[str, Exchange] = {}
    skipped: dict[str, str] = {}
    times = []
    for name in candidates:
        try:
            ex = EXCHANGES.get(name, allow_import=False)(ep_group, world_group, cfg)
        except BraidError as e:
            skipped[name] = str(e)
            times.append(math.inf)
            continue
        times.append(time_dispatch(ex, x_RD, send, recv, iters))
        built[name] = ex
    t = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=world_group)
    seconds = dict(zip(candidates, t.tolist(), strict=True))
    best = min(candidates, key=lambda n: seconds[n])  # first of equals, in candidate order
    if math.isinf(seconds[best]):
        raise BraidError(
            f"exchange.auto_candidates={candidates} has no exchange that runs here; add nccl"
        )
    chosen = built.pop(best)
    built.clear()  # the others go now (symmetric frees its buffers)
    return AutoChoice(best, seconds, skipped, rows, dim, dtype, chosen)


def time_dispatch(
    ex: Exchange, x_RD: Tensor, send: list[int], recv: list[int], iters: int
) -> float:
    """Seconds per movement as a dispatch pays it: `exchange_counts` and the host read of the
    counts (the dispatcher's host sync), then `move` and `wait`. Two warm-up rounds first
    (communicators, buffers)."""
    counts_W1 = torch.tensor(send, dtype=torch.long, device=x_RD.device)[:, None]

    def once() -> None:
        ex.exchange_counts(counts_W1).tolist()
        ex.move(x_RD, send, recv).wait()

    for _ in range(2):
        once()
    _sync(x_RD.device)
    t0 = time.perf_counter()
    for _ in range(iters):
        once()
    _sync(x_RD.device)
    return (time.perf_counter() - t0) / iters


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def find_auto(exchange: Exchange | None) -> AutoExchange | None:
    """The `AutoExchange` in `exchange` (itself, or inside a compressor's wrapper), else None."""
    while exchange is not None and not isinstance(exchange, AutoExchange):
        exchange = getattr(exchange, "inner", None)
    return exchange


class AutoExchange(NcclExchange):
    """Delegates to the exchange `choose_exchange` picks at the first movement."""

    def __init__(self, ep_group, world_group, cfg: ExchangeConfig | None = None):
        super().__init__(ep_group, world_group, cfg)
        self.cfg = cfg if cfg is not None else ExchangeConfig()
        self.choice: AutoChoice | None = None
        self._watchers: list[Callable[[AutoChoice], None]] = []

    @property
    def chosen(self) -> Exchange | None:
        """The exchange everything is delegated to, once chosen."""
        return None if self.choice is None else self.choice.exchange

    def watch(self, fn: Callable[[AutoChoice], None]) -> None:
        """Call `fn(choice)` once the choice is made; at once if it already was."""
        if self.choice is not None:
            fn(self.choice)
        else:
            self._watchers.append(fn)

    def _pick(self, x_RD: Tensor) -> Exchange:
        if self.choice is None:
            self.choice = choose_exchange(
                self.cfg.auto_candidates,
                self.ep_group,
                self.world_group,
                self.cfg,
                x_RD.shape[0],
                math.prod(x_RD.shape[1:]),
                x_RD.dtype,
                x_RD.device,
            )
            watchers, self._watchers = self._watchers, []
            for fn in watchers:
                fn(self.choice)
        return self.choice.exchange

    def exchange_counts(self, send_counts_WL: Tensor) -> Tensor:
        if self.chosen is None:
            return super().exchange_counts(send_counts_WL)
        return self.chosen.exchange_counts(send_counts_WL)

    def move(self, x_RD: Tensor, send_splits: list[int], recv_splits: list[int]) -> Handle:
        return self._pick(x_RD).move(x_RD, send_splits, recv_splits)

    def dispatch(self, x_RD: Tensor, send_splits: list[int], recv_splits: list[int]) -> Handle:
        return self._pick(x_RD).dispatch(x_RD, send_splits, recv_splits)

    def combine(self, y_RD: Tensor, send_splits: list[int], recv_splits: list[int]) -> Handle:
        return self._pick(y_RD).combine(y_RD, send_splits, recv_splits)

    def move_into(
        self, x_RD: Tensor, send_splits: list[int], recv_splits: list[int], out: Tensor
    ) -> Handle:
        return receive_into(self._pick(x_RD), "move", x_RD, send_splits, recv_splits, out)

    def combine_into(
        self, y_RD: Tensor, send_splits: list[int], recv_splits: list[int], out: Tensor
    ) -> Handle:
        return receive_into(self._pick(y_RD), "combine", y_RD, send_splits, recv_splits, out)

    def enable_timing(self) -> None:
        super().enable_timing()  # the chosen exchange shares the EP group

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        if self.chosen is None:
            return super().all_reduce_sum(t)
        return self.chosen.all_reduce_sum(t)
