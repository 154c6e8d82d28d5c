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
  experts (chunks of experts add each expert's dW once: one such add in all).
  `overlap.chunk_dw` may join the chunks' dW instead (`braid.overlap.joined_experts`): one add
  plus a gather of the operands, costed at the bandwidth the measured add implies, or no
  gather where the kernel reads the chunks in place (`fused_join`; "auto" without split_dw
  joins only there, at the last chunk's backward: all the dW GEMMs in that chunk's step);
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
is exposed. A joined routed dW (chunks of tokens, `overlap.chunk_dw`) is queued only after the
last chunk's dX: it fills the last window alone (the shared experts' dW the others).
Shared experts overlap the first exchange in each direction when C > 1 or split_dw.
split_dw here is "experts" or "all" alike: the attention / dense-FFN dW that "all" adds to the
windows (`braid.overlap.dense`) is not modelled.
(`braid.overlap.measure` fits the model at start-up.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from braid.ops.permute import expert_bounds, token_bounds
from braid.overlap.joined_experts import ADD_BYTES, auto_joins

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
    gather_ms_per_byte: float = 0.0  # a joined dW's row gather (0: at the add's bandwidth)
    fused_join: bool = False  # a joined dW reads the chunks in place (`ops.wgrad_triton`)

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
    weight-sized add, into the grads, unless `chunk_dw` joins them: one add and a gather)
    or "experts" (`expert_bounds`; every expert's GEMMs keep all their rows, so the compute
    splits in proportion, and its dW is computed once and added once into its rows of the
    grads: the chunks' adds make one weight-sized add in all, as at C = 1, which both axes
    predict alike)."""
    C, s = chunks, shape
    full = s.tokens * s.top_k
    wire = full * s.dim * s.elem_bytes * (s.ep - 1) / s.ep
    joined = None  # chunks of tokens with a joined routed dW: its add and gather (ms)
    if axis == "experts":
        L = max(s.local_experts or s.num_experts // s.ep, C)
        fr = [(hi - lo) / L for lo, hi in expert_bounds(L, C)]
        dw = [m.dw_accumulate_ms * f for f in fr]
    else:
        fr = [(b - a) / max(s.tokens, 1) for a, b in token_bounds(s.tokens, C)]
        dw = [m.dw_accumulate_ms] * C
        joined = _joined_dw_ms(s, C, m, chunk_dw, split_dw) if C > 1 else None
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
        free = idle * (1.0 - m.interference)
        if joined is None:
            bwd = t + max(0.0, sum(e_dw) + sh - free)
        else:  # the routed dW exists only after the last chunk's dX: the last window alone
            last = min(x[-1], idle) * (1.0 - m.interference)
            bwd = t + max(0.0, sh - (free - last)) + max(0.0, sum(e_dw) - last)
    else:
        e_bwd = [a + b for a, b in zip(e, e_dw, strict=True)]
        if joined is not None:  # every chunk's dW at the last chunk's backward
            e_bwd = [*e[:-1], e[-1] + sum(e_dw)]
        bwd = pipe(e_bwd, x, x) + ((m.both(2 * sh, x[0]) - x[0]) if overlapped else 2 * sh)
    return fwd + bwd + m.overhead_ms + C * m.overhead_per_chunk_ms


def _joined_dw_ms(
    s: LayerShape, C: int, m: CostModel, chunk_dw: str, split_dw: bool = True
) -> float | None:
    """The routed dW's add and gather when `overlap.chunk_dw` joins C chunks of tokens (None:
    per chunk). The gather moves bf16 operands of both weights, read and written (x and g:
    D + 2F a row for w13, F + D for w2), at its measured rate (else the add's); where the
    joined dW reads the chunks in place (`fused_join`) there is no gather. Without split_dw,
    "auto" joins only there (`braid.overlap.joined_experts`)."""
    if chunk_dw == "per_chunk":
        return None
    numel = 3 * (s.local_experts or s.num_experts // s.ep) * s.dim * s.hidden
    gather = 4.0 * s.tokens * s.top_k * (2 * s.dim + 3 * s.hidden)
    if chunk_dw == "auto" and not auto_joins(m.fused_join, split_dw, C, gather, numel):
        return None
    if m.fused_join:  # no gather: one pass like the unchunked layer's
        return m.dw_accumulate_ms
    per_byte = m.gather_ms_per_byte or m.dw_accumulate_ms / (ADD_BYTES * numel)
    return m.dw_accumulate_ms + gather * per_byte


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
