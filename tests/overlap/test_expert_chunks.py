"""Pipeline chunks of experts (`overlap.chunk_by`): the knob and its resolution, each expert's dW
computed once per layer, the plan's routes over `whole`, the session's refusal, and the
planner's two axes (the slices of experts and a part's dW: tests/unit/test_expert_parts.py)."""

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
from braid.ops.permute import expert_bounds
from braid.overlap.config import OverlapConfig, chunk_axis
from braid.overlap.engine import LayerOverlap
from braid.overlap.planner import CostModel, LayerShape, predict_ms
from braid.overlap.session import OverlapSession
from braid.overlap.streams import Clock
from small_moe import seeded_moe
from unit_costs import unit_cost_model

CPU = Clock(torch.device("cpu"))


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
    assert chunk_axis("experts", chunks, L, strict=False) == "tokens"  # the planner's probe


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


# -- each expert's dW once per layer ---------------------------------------------------------


def _moe(fp8: bool = False) -> MoE:
    moe = seeded_moe()
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
    (4 experts per weight over all calls), where C chunks of tokens compute C of them, unless
    their dW is joined (`overlap.chunk_dw`, deferred or not): one call per weight over every
    chunk's rows. The fp8 experts hand over tasks, not operands: per chunk whatever chunk_dw
    says (not deferred, through autograd)."""
    calls: list[tuple[int, int]] = []  # (dW's last dim: which weight, experts in the call)
    if fp8:
        real = fp8_experts.wgrad

        def spy(x, sx, g, offs, impl, dw8):
            calls.append((g.shape[-1], offs.numel()))
            return real(x, sx, g, offs, impl, dw8)

        monkeypatch.setattr(fp8_experts, "wgrad", spy)
    else:
        real = grouped_gemm.gmm_wgrad

        def spy(x, g, offs, *rest):  # (impl, and the dW's dtype where one is asked for)
            calls.append((g.shape[-1], offs.numel()))
            return real(x, g, offs, *rest)

        monkeypatch.setattr(grouped_gemm, "gmm_wgrad", spy)
    base = _moe(fp8)
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))
    ref = _run(copy.deepcopy(base), x)
    assert sorted(calls) == [(16, 4), (24, 4)]  # plain path: w2 (dW [F, D]), w13 ([D, 2F])
    cases = [(by, dw) for by in ("experts", "tokens") for dw in ("joined", "per_chunk")]
    for by, chunk_dw in cases:
        for chunks in (2, 3, 4):
            for split in (False, True):
                calls.clear()
                moe = copy.deepcopy(base)
                moe.overlap = LayerOverlap(0, chunks, split, CPU, chunk_by=by, chunk_dw=chunk_dw)
                got = _run(moe, x)
                per_weight = {n: sum(k for m, k in calls if m == n) for n in (16, 24)}
                joined = by == "tokens" and chunk_dw == "joined" and not fp8
                want = 4 if by == "experts" or joined else 4 * chunks
                assert per_weight == {16: want, 24: want}, (by, chunks, split, calls)
                # one call per weight and chunk, or per weight when joined
                assert len(calls) == (2 if joined else 2 * chunks), (by, chunk_dw, chunks, split)
                if fp8 and not split:  # their dW goes back to autograd (its hooks see it)
                    assert moe.overlap.joined is None, (by, chunk_dw, chunks)
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

# As tests/overlap/test_planner.py (costs in layer units: `unit_cost_model`); here 32 experts
# on 4 ranks, 8 per rank.
SHAPE = LayerShape(tokens=1000, dim=125, hidden=1333, top_k=2, num_experts=32, ep=4, elem_bytes=4)


def _cost(lat=0.05, x_ms=1.0, call=0.01, e_ms=2.0, kappa=0.0, dw=0.0) -> CostModel:
    return unit_cost_model(SHAPE, lat, x_ms, call, e_ms, kappa, dw)


def test_expert_axis_matches_the_hand_derivation():
    # C = 4 of 8 experts: slices 1, 3, 3, 1 (fractions f = 1/8, 3/8, 3/8, 1/8); no latencies,
    # exchange x = f ms, pass e = 2f ms. Forward: x0 + x3 exposed, then chunk c's pass beside
    # the next dispatch and the previous combine: .25 + .375 + .75 + .75 + .375 = 2.5.
    # Backward (dX + dW = 2e): .25 + .5 + 1.5 + 1.5 + .5 = 4.25.
    # Tokens at C = 4: 1000 tokens cut 167, 333, 333, 167 (f = .167, .333). Forward: .334 +
    # .334 (chunk 0's pass, over the link .333 beside it) + .666 + .666 + .334 = 2.334.
    # Backward: .334 + .668 + 1.332 + 1.332 + .668 = 4.334.
    m = _cost(lat=0.0, call=0.0)
    assert predict_ms(SHAPE, 4, False, m, "experts") == pytest.approx(6.75)
    assert predict_ms(SHAPE, 4, False, m, "tokens") == pytest.approx(6.668)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("kappa", [0.0, 0.5])
def test_expert_axis_saves_the_per_chunk_dw_adds(split, kappa):
    # Besides the dW adds the axes differ only in their chunks' fractions, alike at C = 2, 3
    # (8 experts: 4, 4 and 2, 4, 2) and not beyond (C = 4: 1, 3, 3, 1 experts against about
    # 1/6, 1/3, 1/3, 1/6 of the tokens): so what the adds cost is compared, against dW = 0.
    for dw in (0.0, 0.5, 3.0):
        m = _cost(kappa=kappa, dw=dw)
        one = predict_ms(SHAPE, 1, split, m, "tokens")
        assert predict_ms(SHAPE, 1, split, m, "experts") == pytest.approx(one)  # one schedule
        for c in (2, 3, 4, 6, 8):
            experts = predict_ms(SHAPE, c, split, m, "experts")
            tokens = predict_ms(SHAPE, c, split, m, "tokens")
            if c <= 3:
                assert experts <= tokens + 1e-9, (c, dw)
            free = _cost(kappa=kappa)  # dW adds free
            e0, t0 = (predict_ms(SHAPE, c, split, free, a) for a in ("experts", "tokens"))
            assert experts - e0 <= tokens - t0 + 1e-9, (c, dw)  # what the adds cost
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
