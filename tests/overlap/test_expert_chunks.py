"""Pipeline chunks of experts (`overlap.chunk_by`): the slices of local experts, the knob and its
resolution, the dW of a part of the experts added into its rows of the grad, each expert's dW
computed once per layer, the plan's routes over `whole`, the session's refusal, and the
planner's two axes."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch

from braid.config import load_config
from braid.errors import ConfigError
from braid.model.config import ModelConfig
from braid.model.init import init_weights
from braid.model.transformer import Transformer
from braid.moe.config import MoEConfig
from braid.moe.dispatcher import TokenDispatcher
from braid.moe.layer import MoE
from braid.ops import fp8_experts, grouped_gemm
from braid.ops.fp8_stats import Fp8Stats
from braid.ops.grouped_gemm import accumulate_grad, counts_to_offsets, grouped_linear
from braid.ops.permute import expert_bounds
from braid.overlap.config import OverlapConfig, chunk_axis
from braid.overlap.pipeline import LayerOverlap
from braid.overlap.planner import CostModel, LayerShape, predict_ms
from braid.overlap.session import OverlapSession
from braid.overlap.streams import Clock

CPU = Clock(torch.device("cpu"))


# -- expert_bounds --------------------------------------------------------------------------


def _check_cover(bounds: list[tuple[int, int]], L: int, C: int) -> list[int]:
    assert len(bounds) == C and bounds[0][0] == 0 and bounds[-1][1] == L, bounds
    for (_, hi), (lo, _) in zip(bounds[:-1], bounds[1:], strict=True):
        assert hi == lo, bounds  # contiguous
    sizes = [hi - lo for lo, hi in bounds]
    assert min(sizes) >= 1, bounds  # none empty
    return sizes


@pytest.mark.parametrize("L", [1, 2, 3, 4, 5, 7, 8, 12, 16, 31, 32, 64, 100])
def test_expert_bounds_cover_the_experts_in_nonempty_slices_with_short_ends(L):
    for C in range(1, L + 1):
        sizes = _check_cover(expert_bounds(L, C), L, C)
        if C < 3:  # no middle: equal slices, within rounding
            assert max(sizes) - min(sizes) <= 1, (L, C, sizes)
        elif L >= 4 * C:  # weights 1, 2, ..., 2, 1: every boundary rounded once
            middle = L / (C - 1)  # (2C - 2 halves in all)
            for s in sizes[1:-1]:
                assert abs(s - middle) <= 1, (L, C, sizes)
            for s in (sizes[0], sizes[-1]):
                assert abs(s - middle / 2) <= 1, (L, C, sizes)
                assert s < min(sizes[1:-1]), (L, C, sizes)


def test_expert_bounds_known_values():
    assert expert_bounds(4, 1) == [(0, 4)]
    assert expert_bounds(4, 2) == [(0, 2), (2, 4)]
    assert expert_bounds(4, 3) == [(0, 1), (1, 3), (3, 4)]
    assert expert_bounds(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert expert_bounds(8, 4) == [(0, 1), (1, 4), (4, 7), (7, 8)]  # 8 * (1, 3, 5, 6) / 6
    assert expert_bounds(16, 5) == [(0, 2), (2, 6), (6, 10), (10, 14), (14, 16)]


@pytest.mark.parametrize("L,C", [(1, 2), (4, 5), (3, 8), (0, 1)])
def test_expert_bounds_refuse_more_chunks_than_experts(L, C):
    with pytest.raises(ValueError, match=f"{C} chunks > {L} experts"):
        expert_bounds(L, C)


# -- the knob ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "by,chunks,L,axis",
    [
        ("auto", 1, 4, "tokens"),
        ("experts", 1, 4, "tokens"),  # one chunk is the plain path, whatever it holds
        ("tokens", 1, 4, "tokens"),
        ("auto", 2, 4, "experts"),
        ("auto", 4, 4, "experts"),
        ("auto", 5, 4, "tokens"),  # more chunks than experts: auto falls back to tokens
        ("auto", 2, 1, "tokens"),
        ("experts", 2, 4, "experts"),
        ("experts", 4, 4, "experts"),
        ("experts", 1, 1, "tokens"),
        ("tokens", 2, 4, "tokens"),
        ("tokens", 8, 4, "tokens"),
    ],
)
def test_chunk_axis_resolution(by, chunks, L, axis):
    assert chunk_axis(by, chunks, L) == axis
    lo = LayerOverlap(0, chunks, False, CPU, chunk_by=by)
    assert lo.chunking(L) == (chunks, axis)


@pytest.mark.parametrize("chunks,L", [(5, 4), (2, 1), (16, 8)])
def test_chunk_axis_refuses_more_chunks_of_experts_than_experts(chunks, L):
    with pytest.raises(ValueError, match=rf"overlap\.chunk_by.*chunks={chunks}.* {L} experts"):
        chunk_axis("experts", chunks, L)


def test_chunk_by_knob_accepts_its_modes_and_refuses_others():
    assert OverlapConfig().chunk_by == "auto"
    for mode in ("auto", "experts", "tokens"):
        OverlapConfig(chunk_by=mode).validate()
    allowed = r"overlap\.chunk_by='x'.*\"auto\", \"experts\", \"tokens\""
    with pytest.raises(ConfigError, match=allowed):
        OverlapConfig(chunk_by="x").validate()
    with pytest.raises(ConfigError) as e:
        load_config(None, ["--overlap.chunk_by=Experts"])
    msg = str(e.value)
    assert msg.startswith("config overlap.chunk_by=") and "\n" not in msg, msg


# -- dW of a part of the experts --------------------------------------------------------------


def _rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_accumulate_part_without_grad_writes_zeros_elsewhere_and_dw_exactly():
    w = torch.nn.Parameter(_rand(5, 3, 4))
    dw = _rand(2, 3, 4, dtype=torch.bfloat16, seed=1)
    accumulate_grad(w, dw, 1.0, (1, 3))
    assert w.grad.dtype == torch.float32 and w.grad.shape == w.shape
    assert torch.equal(w.grad[1:3], dw.float())
    assert not w.grad[:1].any() and not w.grad[3:].any()


def test_accumulate_part_adds_bf16_dw_into_fp32_grad_bitwise():
    w = torch.nn.Parameter(_rand(5, 3, 4))
    g0 = _rand(5, 3, 4, seed=2)
    w.grad = g0.clone()
    dw = _rand(3, 3, 4, dtype=torch.bfloat16, seed=3)
    accumulate_grad(w, dw, 1.0, (2, 5))
    want = g0.clone()
    want[2:5] = g0[2:5] + dw.float()
    assert torch.equal(w.grad, want)
    accumulate_grad(w, dw, 1.0, (0, 3))  # a second part adds on top, rows 0-2 only
    want[0:3] += dw.float()
    assert torch.equal(w.grad, want)


@pytest.mark.parametrize("divide", [1.0, 3.0])
def test_covering_parts_write_a_new_grad_then_later_passes_add(divide):
    """Parts that cover the weight (the pipeline's chunks of experts: (lo, hi, True)) write
    their rows of a new grad instead of adding into zeros; once whole, the next pass (another
    micro-batch) adds. Bitwise the zeros-then-add reference, both passes."""
    w = torch.nn.Parameter(_rand(6, 3, 4))
    ref = torch.nn.Parameter(w.detach().clone())
    bounds = [(0, 1), (1, 4), (4, 6)]
    for step in range(2):
        for i, (lo, hi) in enumerate(bounds):
            dw = _rand(hi - lo, 3, 4, dtype=torch.bfloat16, seed=10 * step + i)
            accumulate_grad(w, dw.clone(), divide, (lo, hi, True))
            accumulate_grad(ref, dw.clone(), divide, (lo, hi))  # zeros, then adds
            if step == 0 and i < len(bounds) - 1:
                assert w.grad._braid_written == bounds[: i + 1]  # not whole yet
        assert not hasattr(w.grad, "_braid_written")  # whole: the next pass adds
        assert torch.equal(w.grad, ref.grad), step


def test_covering_part_written_twice_in_one_pass_adds():
    """A covering part whose rows were already written in this pass adds (never overwrites)."""
    w = torch.nn.Parameter(_rand(4, 2, 2))
    a, b = _rand(2, 2, 2, seed=1), _rand(2, 2, 2, seed=2)
    accumulate_grad(w, a, 1.0, (0, 2, True))
    accumulate_grad(w, b, 1.0, (0, 2, True))
    assert torch.equal(w.grad[0:2], a + b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("had_grad", [False, True])
def test_accumulate_part_with_a_divide_casts_then_divides_then_adds(dtype, had_grad):
    w = torch.nn.Parameter(_rand(4, 2, 3))
    g0 = _rand(4, 2, 3, seed=4) if had_grad else torch.zeros(4, 2, 3)
    if had_grad:
        w.grad = g0.clone()
    dw = _rand(2, 2, 3, dtype=dtype, seed=5)
    accumulate_grad(w, dw.clone(), 3.0, (1, 3))
    want = g0.clone()
    want[1:3] = g0[1:3] + dw.float() / 3.0
    assert torch.equal(w.grad, want)


def _grouped_case(impl: str):
    E, D, F, part = 5, 8, 16, (1, 4)
    counts = torch.tensor([3, 0, 4])  # experts 1, 2, 3 of the weight; expert 2 has no rows
    x = _rand(int(counts.sum()), D, seed=6).requires_grad_()
    w = torch.nn.Parameter(_rand(E, D, F, seed=7) * 0.3)
    g = _rand(int(counts.sum()), F, seed=8)
    # reference: one matmul per expert, autograd's own dW
    x_ref = x.detach().clone().requires_grad_()
    w_ref = torch.nn.Parameter(w.detach().clone())
    ends = torch.cumsum(counts, 0).tolist()
    rows = zip([0] + ends[:-1], ends, strict=True)
    y_ref = torch.cat([x_ref[a:b] @ w_ref[part[0] + e] for e, (a, b) in enumerate(rows)])
    (y_ref * g).sum().backward()
    return x, w, g, counts, part, impl, (y_ref.detach(), x_ref.grad, w_ref.grad)


@pytest.mark.parametrize("impl", ["grouped", "loop"])
@pytest.mark.parametrize("deferred", [False, True])
@pytest.mark.parametrize("divide", [1.0, 4.0])
def test_grouped_linear_part_uses_its_experts_and_writes_only_their_grad_rows(
    impl, deferred, divide
):
    x, w, g, counts, (lo, hi), impl, (y_ref, dx_ref, dw_ref) = _grouped_case(impl)
    tasks: list = []
    sink = tasks.append if deferred else None
    y = grouped_linear(x, w, counts_to_offsets(counts), impl, sink, divide, None, (lo, hi))
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    (y * g).sum().backward()
    torch.testing.assert_close(x.grad, dx_ref, rtol=1e-6, atol=1e-6)
    if deferred:
        assert w.grad is None and len(tasks) == 1  # nothing until the task runs
        tasks.pop()()
    assert w.grad.shape == w.shape
    assert not w.grad[:lo].any() and not w.grad[hi:].any()
    assert not w.grad[2].any()  # expert 2 had no rows
    torch.testing.assert_close(w.grad, dw_ref / divide, rtol=1e-6, atol=1e-6)
    assert not dw_ref[:lo].any() and not dw_ref[hi:].any()  # (the reference agrees)


def test_grouped_linear_parts_of_one_weight_add_up_to_the_whole_dw():
    """Two parts of one weight, each its own call and backward (two chunks of experts): the
    grad is the one call's over all experts, with the calls' rows split by expert."""
    E, D, F = 4, 8, 16
    counts = torch.tensor([2, 3, 1, 4])
    x = _rand(10, D, seed=9)
    w = torch.nn.Parameter(_rand(E, D, F, seed=10))
    g = _rand(10, F, seed=11)
    (grouped_linear(x, w, counts_to_offsets(counts)) * g).sum().backward()
    whole = w.grad.clone()
    w.grad = None
    for (lo, hi), (a, b) in zip([(0, 1), (1, 4)], [(0, 2), (2, 10)], strict=True):
        offs = counts_to_offsets(counts[lo:hi])
        (grouped_linear(x[a:b], w, offs, part=(lo, hi)) * g[a:b]).sum().backward()
    torch.testing.assert_close(w.grad, whole, rtol=1e-6, atol=1e-6)


# -- each expert's dW once per layer ---------------------------------------------------------


def _moe(fp8: bool = False) -> MoE:
    moe = MoE(ModelConfig(dim=16), MoEConfig(num_experts=4, top_k=2, expert_hidden=12))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    if fp8:
        moe.experts.fp8_stats = Fp8Stats()  # the fp8 experts, emulated on CPU
    return moe


def _run(moe: MoE, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_()
    y, stats = moe(x)
    (y.square().sum() + stats.aux_loss).backward()
    if moe.overlap is not None:
        assert len(moe.overlap.queue) == 0  # the flush point ran every deferred dW
    return [y.detach(), x.grad] + [p.grad for p in moe.parameters()]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    err = float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))
    return err if math.isfinite(err) else math.inf  # NaN never passes


@pytest.mark.parametrize("fp8", [False, True])
def test_chunks_of_experts_compute_each_experts_dw_once(monkeypatch, fp8):
    """Spy on the dW GEMM: with C chunks of experts every expert's dW is one group of one call
    (4 experts per weight over all calls), where C chunks of tokens compute C of them."""
    calls: list[tuple[int, int]] = []  # (dW's last dim: which weight, experts in the call)
    if fp8:
        real = fp8_experts.wgrad

        def spy(x, sx, g, offs, impl, dw8):
            calls.append((g.shape[-1], offs.numel()))
            return real(x, sx, g, offs, impl, dw8)

        monkeypatch.setattr(fp8_experts, "wgrad", spy)
    else:
        real = grouped_gemm.gmm_wgrad

        def spy(x, g, offs, impl):
            calls.append((g.shape[-1], offs.numel()))
            return real(x, g, offs, impl)

        monkeypatch.setattr(grouped_gemm, "gmm_wgrad", spy)
    base = _moe(fp8)
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))
    ref = _run(copy.deepcopy(base), x)
    assert sorted(calls) == [(16, 4), (24, 4)]  # plain path: w2 (dW [F, D]), w13 ([D, 2F])
    for by in ("experts", "tokens"):
        for chunks in (2, 3, 4):
            for split in (False, True):
                calls.clear()
                moe = copy.deepcopy(base)
                moe.overlap = LayerOverlap(0, chunks, split, CPU, chunk_by=by)
                got = _run(moe, x)
                per_weight = {n: sum(k for m, k in calls if m == n) for n in (16, 24)}
                want = 4 if by == "experts" else 4 * chunks
                assert per_weight == {16: want, 24: want}, (by, chunks, split, calls)
                assert len(calls) == 2 * chunks  # one call per weight and chunk either way
                err = max(_rel(a, b) for a, b in zip(got, ref, strict=True))
                assert err < 1e-5, (by, chunks, split, err)


# -- the plan --------------------------------------------------------------------------------


def _topk(N: int, seed: int, skew: bool) -> torch.Tensor:
    """Top-2 of 4 experts per token (distinct); `skew` sends most tokens to expert 0."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(N, 4, generator=gen)
    if skew:
        scores[:, 0] += 1.0
    return scores.topk(2, dim=1).indices


def _kept_in_expert_order(topk: torch.Tensor, capacity: int | None) -> torch.Tensor:
    """Reference: the copies (n*K + k) sorted by expert, then copy index; in capacity mode each
    expert keeps its earliest `capacity` copies."""
    flat = topk.flatten().tolist()
    kept = []
    for e in range(4):
        mine = [i for i, x in enumerate(flat) if x == e]
        kept += mine if capacity is None else mine[:capacity]
    return torch.tensor(kept, dtype=torch.long)


@pytest.mark.parametrize("capacity", [0.0, 1.0])
@pytest.mark.parametrize("chunks", [2, 3, 4])
def test_plan_of_expert_chunks_partitions_whole_by_local_experts(capacity, chunks):
    N, K = 13, 2
    topk = _topk(N, seed=chunks, skew=capacity > 0)
    d = TokenDispatcher(4, K, capacity_factor=capacity)
    plan = d.plan(topk, chunks, by="experts")
    whole, routes = plan.whole, plan.routes
    cap = d.capacity(N) if capacity > 0 else None
    want = _kept_in_expert_order(topk, cap)
    M = want.numel()
    if capacity > 0:
        assert int(plan.num_dropped) == N * K - M > 0  # the skew drops copies of expert 0
    else:
        assert M == N * K and int(plan.num_dropped) == 0
    # whole: every kept copy once, in (chunk, expert) order (one rank: the experts' order),
    # the same route as the plain path's
    assert torch.equal(whole.order_M, want)
    plain = d.plan(topk, 1)
    assert plain.whole is None and torch.equal(plain.routes[0].order_M, whole.order_M)
    assert torch.equal(whole.token_M, whole.order_M // K)
    assert torch.equal(whole.counts_L, plain.routes[0].counts_L)
    if capacity == 0:
        flat_pos = whole.pos_NK.flatten()
        assert torch.equal(whole.order_M[flat_pos], torch.arange(N * K))
    else:
        assert whole.pos_NK is None
    # the routes: consecutive rows of whole, each of its own experts only
    assert [r.part for r in routes] == expert_bounds(4, chunks)
    assert routes[0].rows[0] == 0 and routes[-1].rows[1] == M
    for r0, r1 in zip(routes[:-1], routes[1:], strict=True):
        assert r0.rows[1] == r1.rows[0]
    assert torch.equal(torch.cat([r.order_M for r in routes]), whole.order_M)
    flat = topk.flatten()
    for r in routes:
        (lo, hi), (a, b) = r.part, r.rows
        assert torch.equal(r.order_M, whole.order_M[a:b])
        assert torch.equal(r.token_M, r.order_M // K)
        experts = flat[r.order_M]
        assert bool(((experts >= lo) & (experts < hi)).all()), (r.part, experts)
        assert r.counts_L.numel() == hi - lo and int(r.counts_L.sum()) == b - a
        assert torch.equal(r.counts_L, torch.bincount(experts - lo, minlength=hi - lo))
        assert r.send == r.recv == [b - a]
        assert (r.start, r.stop) == (0, N) and r.pos_NK is None


def test_plan_of_one_chunk_of_experts_is_the_plain_plan():
    topk = _topk(9, seed=0, skew=False)
    d = TokenDispatcher(4, 2)
    one, plain = d.plan(topk, 1, by="experts"), d.plan(topk, 1)
    assert one.whole is None and one.routes[0].part is None
    assert torch.equal(one.routes[0].order_M, plain.routes[0].order_M)


# -- the session -----------------------------------------------------------------------------


def _model() -> Transformer:
    mc = ModelConfig(dim=32, n_layers=3, n_heads=2, vocab_size=64, ffn_hidden=64, max_seq_len=32)
    model = Transformer(mc, MoEConfig(num_experts=4, top_k=2, expert_hidden=16))
    init_weights(model, 0, 0.02, 3)
    return model


def _install(model: Transformer, cfg: OverlapConfig) -> OverlapSession:
    return OverlapSession.install(
        model, cfg, device=torch.device("cpu"), tokens_per_rank=32, dtype=torch.float32
    )


def test_session_refuses_more_chunks_of_experts_than_experts():
    with pytest.raises(ValueError, match=r"overlap\.chunk_by.*chunks=8.* 4 experts"):
        _install(_model(), OverlapConfig(chunks=8, chunk_by="experts"))


@pytest.mark.parametrize(
    "chunks,by,axis", [(4, "experts", "experts"), (8, "auto", "tokens"), (2, "tokens", "tokens")]
)
def test_session_installs_the_chosen_axis(chunks, by, axis):
    model = _model()
    s = _install(model, OverlapConfig(chunks=chunks, chunk_by=by))
    assert s.layers and all(m.overlap is not None for m in model.moe_modules().values())
    for moe in model.moe_modules().values():
        assert moe.overlap.chunking(moe.dispatcher.num_local) == (chunks, axis)


# -- the planner -----------------------------------------------------------------------------

# As tests/overlap/test_planner.py: the full dispatch moves 1e6 bytes across ranks and a full
# expert pass is 1e9 FLOPs; here 32 experts on 4 ranks, 8 per rank.
SHAPE = LayerShape(tokens=1000, dim=125, hidden=1333, top_k=2, num_experts=32, ep=4, elem_bytes=4)
WIRE = SHAPE.tokens * SHAPE.top_k * SHAPE.dim * SHAPE.elem_bytes * 3 / 4
FLOPS = 6.0 * SHAPE.tokens * SHAPE.top_k * SHAPE.dim * SHAPE.hidden


def _cost(lat=0.05, x_ms=1.0, call=0.01, e_ms=2.0, kappa=0.0, dw=0.0) -> CostModel:
    return CostModel(
        a2a_latency_ms=lat,
        a2a_ms_per_byte=x_ms / WIRE,
        gemm_latency_ms=call,
        gemm_ms_per_flop=e_ms / FLOPS,
        interference=kappa,
        dw_accumulate_ms=dw,
    )


def test_expert_axis_matches_the_hand_derivation():
    # C = 4 of 8 experts: slices 1, 3, 3, 1 (fractions f = 1/8, 3/8, 3/8, 1/8); no latencies,
    # exchange x = f ms, pass e = 2f ms. Forward: x0 + x3 exposed, then chunk c's pass beside
    # the next dispatch and the previous combine: .25 + .375 + .75 + .75 + .375 = 2.5.
    # Backward (dX + dW = 2e): .25 + .5 + 1.5 + 1.5 + .5 = 4.25. Tokens at C = 4: 2.5 + 4.5.
    m = _cost(lat=0.0, call=0.0)
    assert predict_ms(SHAPE, 4, False, m, "experts") == pytest.approx(6.75)
    assert predict_ms(SHAPE, 4, False, m, "tokens") == pytest.approx(7.0)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("kappa", [0.0, 0.5])
def test_expert_axis_saves_the_per_chunk_dw_adds(split, kappa):
    for dw in (0.0, 0.5, 3.0):
        m = _cost(kappa=kappa, dw=dw)
        one = predict_ms(SHAPE, 1, split, m, "tokens")
        assert predict_ms(SHAPE, 1, split, m, "experts") == pytest.approx(one)  # one schedule
        for c in (2, 3, 4, 6, 8):
            experts = predict_ms(SHAPE, c, split, m, "experts")
            tokens = predict_ms(SHAPE, c, split, m, "tokens")
            assert experts <= tokens + 1e-9, (c, dw)
            if dw >= 3.0:  # C - 1 weight-sized adds more with token chunks
                assert experts < tokens - 1.0, (c, dw, experts, tokens)


def test_expert_axis_keeps_one_dw_add_in_all():
    """Chunks of experts add each expert's dW into its grad rows once: the whole of the adds is
    one weight, as the plain path's, whatever C (no compute to hide it behind: only the adds)."""
    shape = replace(SHAPE, ep=1)  # no exchanges: the region is the passes plus the adds
    base = _cost(dw=0.0)
    for c in (1, 2, 4, 8):
        added = predict_ms(shape, c, False, _cost(dw=2.0), "experts")
        assert added - predict_ms(shape, c, False, base, "experts") == pytest.approx(2.0)


def test_planner_slices_the_experts_the_rank_holds(monkeypatch):
    """A simulated exchange's one rank holds all E experts while its traffic is that of `ep`
    ranks: the expert axis is modelled on the experts held (`local_experts`), not E / ep."""
    import braid.overlap.planner as planner_mod

    seen = []
    real = planner_mod.expert_bounds
    monkeypatch.setattr(planner_mod, "expert_bounds", lambda L, C: (seen.append(L), real(L, C))[1])
    shape = LayerShape(tokens=4096, dim=64, hidden=96, top_k=8, num_experts=64, ep=4, elem_bytes=2)
    m = CostModel(a2a_latency_ms=0.05, a2a_ms_per_byte=1e-6, gemm_latency_ms=0.01,
                  gemm_ms_per_flop=1e-9)  # fmt: skip
    predict_ms(shape, 4, True, m, "experts")
    predict_ms(replace(shape, local_experts=64), 4, True, m, "experts")
    assert seen == [16, 64]
