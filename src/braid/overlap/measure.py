"""Fitting the planner's cost model (`braid.overlap.planner.CostModel`) at start-up.

Job: time, at this run's shapes, what the model needs (exchanges and expert passes at the
chunk sizes, one beside the other, the non-GEMM work of the region, one dW add, a joined dW's
gather, compression's factors), agree on the numbers across ranks, and fit the model.

Phases of `measure` (collective: every rank calls it with the same shape): time exchanges at
the chunk sizes (each repetition starts after a barrier, so rank skew is not timed), expert
passes at the chunk sizes, one exchange beside one expert pass, and one dW accumulation;
all-reduce MAX over the world so every rank fits the same model and picks the same C (chunk
exchanges must match across ranks); fit.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from braid.ops.grouped_gemm import counts_to_offsets, grouped_linear
from braid.overlap.joined_experts import fused_join
from braid.overlap.planner import CostModel, LayerShape
from braid.overlap.streams import synchronize


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope), both clamped at >= 0."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    slope = 0.0 if var == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var
    slope = max(slope, 0.0)
    return max(my - slope * mx, 0.0), slope


def fit(
    samples: dict[str, list[tuple[float, float]]],
    both_ms: float,
    alone: tuple[float, float],
    dw_accumulate_ms: float = 0.0,
) -> CostModel:
    """A model from (size, ms) samples: 'a2a' (bytes), 'gemm' (FLOPs per two-call expert pass);
    `both_ms` is one exchange beside one GEMM pass whose alone times are `alone`."""
    a_lat, a_slope = fit_line(*zip(*samples["a2a"], strict=True)) if samples["a2a"] else (0, 0)
    g_lat, g_slope = fit_line(*zip(*samples["gemm"], strict=True))
    lo, hi = min(alone), max(alone)
    kappa = 0.0 if lo <= 0 else min(max((both_ms - hi) / lo, 0.0), 1.0)
    return CostModel(a_lat, a_slope, g_lat / 2, g_slope, kappa, dw_accumulate_ms)


def _median_ms(
    fn: Callable[[], Any], device: torch.device, reps: int, align: Callable[[], Any] | None = None
) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        synchronize(device)
        if align is not None:  # start every rank together, so rank skew is not timed
            align()
            synchronize(device)
        t = time.perf_counter()
        fn()
        synchronize(device)
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def measure(
    shape: LayerShape,
    exchange: Any,
    experts: Any,
    device: torch.device,
    dtype: torch.dtype,
    reps: int = 5,
    fractions: tuple[int, ...] = (1, 2, 4, 8),
    dispatcher: Any = None,
    axis: Callable[[int], str] = lambda c: "tokens",
) -> CostModel:
    """Time exchanges and expert passes at this run's chunk sizes, agree (MAX) across ranks, fit.
    The expert pass is the experts' forward (`grouped_linear` x2 + SwiGLU) on stand-in fp32
    weights of the local shape under autocast to `dtype`, as in training, with the weights cast
    once outside the timing (a layer's chunks share one cast, whatever C; the one cast per layer
    does not depend on C and is left out). (Not the module itself: calling an FSDP
    unit outside the model's forward would make it a root.) With `dispatcher` (the layer's,
    duck-typed `braid.moe.dispatcher.TokenDispatcher`) the non-GEMM work is measured too, with
    the chunks `axis(C)` says a layer of C chunks will hold ("tokens" or "experts")."""
    s, W, L = shape, shape.ep, experts.num_experts
    group = getattr(exchange, "ep_group", None)
    ranks = W > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    align = (lambda: torch.distributed.barrier(group=group)) if ranks else None
    amp = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    def inputs(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        counts = torch.full((L,), rows // L, dtype=torch.long, device=device)
        counts[-1] += rows - int(counts.sum())
        return torch.randn(rows, s.dim, device=device), counts

    w13 = torch.randn(L, s.dim, 2 * s.hidden, device=device) * 0.02
    w2 = torch.randn(L, s.hidden, s.dim, device=device) * 0.02
    impl = getattr(experts, "impl", "grouped")
    casts: dict = {}  # the weights are cast once per layer, whatever C (`shared_casts`)

    def expert_pass(x: torch.Tensor, counts: torch.Tensor) -> None:
        with torch.no_grad(), amp:
            offs = counts_to_offsets(counts)
            gate, up = grouped_linear(x, w13, offs, impl, casts=casts).chunk(2, dim=-1)
            grouped_linear(F.silu(gate) * up, w2, offs, impl, casts=casts)

    times: list[float] = []
    sizes: list[tuple[str, float]] = []
    for f in fractions:
        rows = max(W, s.tokens * s.top_k // f) // W * W
        x, counts = inputs(rows)
        times.append(_median_ms(lambda x=x, c=counts: expert_pass(x, c), device, reps))
        sizes.append(("gemm", 6.0 * rows * s.dim * s.hidden))
        if W > 1:
            split = [rows // W] * W
            times.append(
                _median_ms(
                    lambda x=x, sp=split: exchange.move(x, sp, sp).wait(), device, reps, align
                )
            )
            sizes.append(("a2a", rows * s.dim * x.element_size() * (W - 1) / W))
    both = 0.0
    if W > 1:  # the full-size exchange beside the full-size expert pass
        rows = s.tokens * s.top_k // W * W
        x, counts = inputs(rows)
        split = [rows // W] * W

        def together():
            h = exchange.move(x, split, split)
            expert_pass(x, counts)
            h.wait()

        both = _median_ms(together, device, reps, align)
    # What a chunk's backward adds per expert weight: its dW (compute dtype) added into the
    # fp32 grad of the local experts (w13 [L, D, 2F], w2 [L, F, D]) without an fp32 copy, as
    # `grouped_gemm.accumulate_grad` does.
    accs = [
        (torch.zeros(shp, device=device), torch.zeros(shp, device=device, dtype=dtype))
        for shp in ((L, s.dim, 2 * s.hidden), (L, s.hidden, s.dim))
    ]
    acc_ms = _median_ms(lambda: [a.add_(d) for a, d in accs], device, reps)
    # A joined dW's gather (`braid.overlap.joined_experts`): rows placed by `index_copy_`.
    rows = max(s.tokens * s.top_k, 1)
    src = torch.zeros(rows, s.dim, device=device, dtype=dtype)
    dst, where = torch.empty_like(src), torch.randperm(rows, device=device)
    gather_ms = _median_ms(lambda: dst.index_copy_(0, where, src), device, reps)
    extra = [0.0, 0.0, 1.0, 1.0]  # overhead at C = 1 and 4; dispatch, combine factors
    if dispatcher is not None:
        extra[:2] = [_token_side_ms(dispatcher, s, c, device, dtype, reps, axis(c)) for c in (1, 4)]
    if W > 1 and getattr(exchange, "compressor", None) is not None:
        rows = s.tokens * s.top_k // W * W
        x = torch.randn(rows, s.dim, device=device, dtype=dtype)
        split = [rows // W] * W
        go = {n: getattr(exchange, n) for n in ("move", "dispatch", "combine")}
        t = {
            n: _median_ms(lambda f=f: f(x, split, split).wait(), device, reps, align)
            for n, f in go.items()
        }
        extra[2:] = [t["dispatch"] / t["move"], t["combine"] / t["move"]]
    agreed = max_over_world(times + [both, acc_ms] + extra + [gather_ms], exchange, device)
    gather_ms = agreed.pop()
    samples: dict[str, list[tuple[float, float]]] = {"a2a": [], "gemm": []}
    for (kind, size), t in zip(sizes, agreed[:-6], strict=True):
        samples[kind].append((size, t))
    alone = (samples["gemm"][0][1], samples["a2a"][0][1] if samples["a2a"] else 0.0)
    m = fit(samples, agreed[-6], alone, agreed[-5])
    one, four, fd, fc = agreed[-4:]
    per_chunk = max((four - one) / 3, 0.0)
    return replace(
        m,
        overhead_ms=max(one - per_chunk, 0.0),
        overhead_per_chunk_ms=per_chunk,
        dispatch_factor=fd,
        combine_factor=fc,
        gather_ms_per_byte=gather_ms / (2 * rows * s.dim * dtype.itemsize),
        fused_join=fused_join(experts.w13, [src], [src]),
    )


def _token_side_ms(
    dispatcher: Any,
    s: LayerShape,
    chunks: int,
    device: torch.device,
    dtype: torch.dtype,
    reps: int,
    by: str = "tokens",
) -> float:
    """The region's non-GEMM work at C = `chunks` chunks of `by` on balanced random routing: the
    plan (counts exchanged, host sync) and, per route, the token-side gathers and weighted sums
    of the forward and their backward (chunks of experts: the weighted sums and their backward
    once, over the plan's `whole`, as the pipeline does; the expert-side regroup is left out:
    it needs received rows)."""
    gen = torch.Generator(device=device).manual_seed(0)
    N, K, E = s.tokens, s.top_k, dispatcher.num_experts
    topk = torch.rand(N, E, device=device, generator=gen).topk(K, dim=1).indices.sort(1).values
    x = torch.randn(N, s.dim, device=device, dtype=dtype, generator=gen)
    gates = torch.full((N, K), 1.0 / K, device=device, dtype=dtype)

    def run() -> None:
        plan = dispatcher.plan(topk, chunks, by)
        rows = [dispatcher.send_rows(x, r) for r in plan.routes]
        pairs = list(zip(rows, plan.routes, strict=True))
        if plan.whole is not None:
            pairs = [(torch.cat(rows), plan.whole)]
        for rows_r, r in pairs:
            dispatcher.finish(rows_r, gates, r)
            g_rows, _ = dispatcher.combine_grad(x, rows_r, gates, r)
            dispatcher.finish_grad(g_rows, r, dtype)

    with torch.no_grad():
        return _median_ms(run, device, reps)


def max_over_world(values: list[float], exchange: Any, device: torch.device) -> list[float]:
    """`values` agreed across the ranks of `exchange.world_group` (elementwise MAX; as is
    without a process group), so every rank decides from the same numbers."""
    t = torch.tensor(values, dtype=torch.float64)
    group = getattr(exchange, "world_group", None)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = t.to(device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=group)
    return t.cpu().tolist()
