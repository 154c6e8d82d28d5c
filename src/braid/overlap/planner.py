"""The overlap planner: a measured cost model of one MoE layer and the chunk count it implies.

Job: for `overlap.chunks = "auto"`, pick C per MoE layer to minimise the predicted forward +
backward time of the pipelined region, and say what it predicts (logged beside the measured
time, so the model's error is visible).

Cost model (all times in ms; fitted at start-up by `measure`, or given by tests):
- exchange of b bytes crossing ranks: a2a_latency + b * a2a_ms_per_byte (0 without EP);
- grouped GEMM call of f FLOPs: gemm_latency + f * gemm_ms_per_flop, fitted on the experts'
  forward at the chunk sizes (dX and dW of a GEMM cost what its forward costs);
- compute and exchange at once: max(x, y) + interference * min(x, y) (0: perfect overlap,
  1: serialised, e.g. by SM or memory-bandwidth contention);
- per chunk of tokens, the backward writes one weight-sized dW per expert GEMM into the fp32
  grads (dw_accumulate_ms): a fixed cost per chunk that makes many chunks expensive for big
  experts (chunks of experts add each expert's dW once: one such add in all). With split_dw,
  `overlap.chunk_dw` may join the chunks' dW instead (`braid.overlap.joined_experts`): one add
  plus a gather of the operands, costed at the bandwidth the measured add implies;
- the non-GEMM work of the region, measured on the layer's own dispatcher (its plan with the
  count exchange and host sync, the token-side gathers, weighted sums and their backward):
  overhead_ms + C * overhead_per_chunk_ms, serial on the compute stream;
- compression: the forward dispatch (and combine, with exchange.compress_combine) is timed
  through the exchange's own `dispatch`/`combine` (encode + packed move + decode) against the
  exact `move` the gradients take: dispatch_factor, combine_factor scale those exchanges.
Per chunk c (balanced routing, its share of the N*K rows: `token_bounds` or `expert_bounds`,
the first and the last about half the others): d_c = b_c = one exchange, e_c = the expert
GEMMs. Pipeline (3 stages; the two exchanges share the link, so chunk c's compute runs beside
the next chunk's dispatch and the previous chunk's combine):
  T(C) = d_0 + b_{C-1} + sum_c both(e_c, d_{c+1} + b_{c-1})   (d_C = b_{-1} = 0)
Forward: e = e_fwd. Backward: e = e_dX + e_dW, or with split_dw e = e_dX and the deferred dW
GEMMs (sum_c e_dW) fill the idle compute time (T - sum_c e_dX) * (1 - interference); the rest
is exposed.
Shared experts overlap the first exchange in each direction when C > 1 or split_dw.
split_dw here is "experts" or "all" alike: the attention / dense-FFN dW that "all" adds to the
windows (`braid.overlap.dense`) is not modelled.

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
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from braid.ops.grouped_gemm import counts_to_offsets, grouped_linear
from braid.ops.permute import expert_bounds, token_bounds
from braid.overlap.joined_experts import ADD_BYTES, joined_is_cheaper
from braid.overlap.streams import synchronize

CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16)


@dataclass(frozen=True)
class LayerShape:
    tokens: int  # tokens per rank per micro-batch
    dim: int
    hidden: int  # routed expert hidden size
    top_k: int
    num_experts: int
    ep: int
    elem_bytes: float  # bytes per element on the wire, averaged over the layer's exchanges
    shared_hidden: int = 0  # total hidden of the shared experts (0: none)
    local_experts: int = 0  # experts this rank holds (0: num_experts // ep)


@dataclass(frozen=True)
class CostModel:
    a2a_latency_ms: float
    a2a_ms_per_byte: float
    gemm_latency_ms: float
    gemm_ms_per_flop: float
    interference: float = 0.0
    dw_accumulate_ms: float = 0.0  # per chunk: the add of the experts' dW into their grads
    overhead_ms: float = 0.0  # non-GEMM work of the region, once per layer
    overhead_per_chunk_ms: float = 0.0  # ... and once per chunk
    dispatch_factor: float = 1.0  # forward dispatch time / exact move time (compression)
    combine_factor: float = 1.0  # forward combine time / exact move time

    def exchange_ms(self, nbytes: float, ep: int) -> float:
        return 0.0 if ep == 1 else self.a2a_latency_ms + nbytes * self.a2a_ms_per_byte

    def gemm_ms(self, flops: float, calls: int = 1) -> float:
        return calls * self.gemm_latency_ms + flops * self.gemm_ms_per_flop

    def both(self, x: float, y: float) -> float:
        return max(x, y) + self.interference * min(x, y)


# Smallest predicted gain (a fraction of the plain path's time) that chunking must show.
PLAN_MARGIN = 0.02


def predict_ms(
    shape: LayerShape,
    chunks: int,
    split_dw: bool,
    m: CostModel,
    axis: str = "tokens",
    chunk_dw: str = "auto",
) -> float:
    """Predicted forward + backward ms of the layer's pipelined region at C = `chunks` chunks
    of `axis`, each chunk costed at its fraction of the layer (both axes make the first and
    the last chunk about half the others, C >= 3: the pipeline's fill and drain): "tokens"
    (`token_bounds` over `shape.tokens`; each chunk adds its experts' dW, a whole
    weight-sized add, into the grads) or "experts" (`expert_bounds`; every expert's GEMMs
    keep all their rows, so the compute splits in proportion, and its dW is computed once and
    added once into its rows of the grads: the chunks' adds make one weight-sized add in all,
    as at C = 1, which both axes predict alike)."""
    C, s = chunks, shape
    full = s.tokens * s.top_k
    wire = full * s.dim * s.elem_bytes * (s.ep - 1) / s.ep
    if axis == "experts":
        L = max(s.local_experts or s.num_experts // s.ep, C)
        fr = [(hi - lo) / L for lo, hi in expert_bounds(L, C)]
        dw = [m.dw_accumulate_ms * f for f in fr]
    else:
        fr = [(b - a) / max(s.tokens, 1) for a, b in token_bounds(s.tokens, C)]
        dw = [m.dw_accumulate_ms] * C
        joined = _joined_dw_ms(s, C, m, chunk_dw) if split_dw and C > 1 else None
        if joined is not None:  # one add, and the gather, spread like the rows
            dw = [joined * f for f in fr]
    x = [m.exchange_ms(wire * f, s.ep) for f in fr]
    flops = 6.0 * full * s.dim * s.hidden  # w13: 2*D*2F, w2: 2*F*D per row
    e = [m.gemm_ms(flops * f, calls=2) for f in fr]
    e_dw = [t + a for t, a in zip(e, dw, strict=True)]

    def pipe(e_c: list[float], before: list[float], after: list[float]) -> float:
        """Chunk c's compute e_c[c] beside the next chunk's `before` exchange and the previous
        chunk's `after` one; the first `before` and the last `after` are exposed."""
        t = before[0] + after[-1]
        for c in range(C):
            link = (before[c + 1] if c + 1 < C else 0.0) + (after[c - 1] if c else 0.0)
            t += m.both(e_c[c], link)
        return t

    d_fwd = [t * m.dispatch_factor for t in x]
    b_fwd = [t * m.combine_factor for t in x]
    overlapped = C > 1 or split_dw  # the schedule that overlaps the shared experts
    sh_flops = 6.0 * s.tokens * s.dim * s.shared_hidden
    sh = m.gemm_ms(sh_flops, calls=2) if s.shared_hidden else 0.0
    if split_dw and s.shared_hidden:  # token halves: S0 beside the first dispatch, S1 the last
        half = m.gemm_ms(sh_flops / 2, calls=2)
        side = m.both(half, d_fwd[0]) - d_fwd[0] + m.both(half, b_fwd[-1]) - b_fwd[-1]
    else:
        side = (m.both(sh, d_fwd[0]) - d_fwd[0]) if overlapped else sh
    fwd = pipe(e, d_fwd, b_fwd) + side
    if split_dw:
        t = pipe(e, x, x) + m.both(sh, x[0]) - x[0]  # dX only (e_dX == e_fwd), shared dX beside Bg0
        idle = max(t - sum(e) - sh, 0.0)  # compute-stream time spent waiting on exchanges
        bwd = t + max(0.0, sum(e_dw) + sh - idle * (1.0 - m.interference))
    else:
        e_bwd = [a + b for a, b in zip(e, e_dw, strict=True)]
        bwd = pipe(e_bwd, x, x) + ((m.both(2 * sh, x[0]) - x[0]) if overlapped else 2 * sh)
    return fwd + bwd + m.overhead_ms + C * m.overhead_per_chunk_ms


def _joined_dw_ms(s: LayerShape, C: int, m: CostModel, chunk_dw: str) -> float | None:
    """The routed dW's add and gather when `overlap.chunk_dw` joins C chunks of tokens (None:
    per chunk). The gather moves bf16 operands of both weights, read and written (x and g:
    D + 2F a row for w13, F + D for w2), at the bandwidth the measured add shows."""
    if chunk_dw == "per_chunk":
        return None
    numel = 3 * (s.local_experts or s.num_experts // s.ep) * s.dim * s.hidden
    gather = 4.0 * s.tokens * s.top_k * (2 * s.dim + 3 * s.hidden)
    if chunk_dw == "auto" and not joined_is_cheaper(C, gather, numel):
        return None
    return m.dw_accumulate_ms * (1.0 + gather / (ADD_BYTES * numel))


def choose_chunks(
    shape: LayerShape,
    split_dw: bool,
    m: CostModel,
    candidates: tuple[int, ...] = CANDIDATES,
    axis: Callable[[int], str] = lambda c: "tokens",
    chunk_dw: str = "auto",
) -> tuple[int, float, dict[int, float]]:
    """(best C, its prediction, every candidate's prediction); ties go to the smaller C, and
    chunking must be predicted at least `PLAN_MARGIN` faster than the plain path (C = 1): the
    fit's noise alone should not buy a chunked schedule where there is little to hide."""
    usable = [c for c in candidates if c == 1 or c <= shape.tokens]
    table = {c: predict_ms(shape, c, split_dw, m, axis(c), chunk_dw) for c in usable}
    best = min(usable, key=lambda c: (round(table[c], 9), c))
    if 1 in table and table[best] > table[1] * (1.0 - PLAN_MARGIN):
        best = 1
    return best, table[best], table


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
    agreed = max_over_world(times + [both, acc_ms] + extra, exchange, device)
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


def describe(
    layer: int, shape: LayerShape, best: int, table: dict[int, float], split_dw: bool, m: CostModel
) -> str:
    """The plan's log line."""
    preds = ", ".join(f"C={c}: {ms:.3f}" for c, ms in table.items())
    return (
        f"overlap plan moe{layer}: chunks={best} split_dw={split_dw} predicted "
        f"{table[best]:.3f} ms fwd+bwd ({preds}) | model: a2a {m.a2a_latency_ms:.3f} ms + "
        f"{m.a2a_ms_per_byte * 1e6:.4f} ms/MB, gemm {m.gemm_latency_ms:.3f} ms/call + "
        f"{m.gemm_ms_per_flop * 1e12:.3f} ms/TFLOP, dW accumulate "
        f"{m.dw_accumulate_ms:.3f} ms/chunk, interference {m.interference:.2f}, non-GEMM "
        f"{m.overhead_ms:.3f} ms + {m.overhead_per_chunk_ms:.3f} ms/chunk, dispatch x"
        f"{m.dispatch_factor:.2f} combine x{m.combine_factor:.2f}"
    )
