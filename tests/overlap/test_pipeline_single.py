"""The chunked pipeline in one process equals the plain MoE path; the session installs, times,
reports and traces it."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from braid.model.config import ModelConfig
from braid.model.init import init_weights
from braid.model.transformer import Transformer
from braid.moe.config import MoEConfig
from braid.moe.layer import MoE
from braid.ops.permute import expert_bounds, token_bounds
from braid.overlap.config import OverlapConfig
from braid.overlap.engine import LayerOverlap
from braid.overlap.session import OverlapSession
from braid.overlap.streams import Clock
from small_moe import moe_step, seeded_moe

CPU = Clock(torch.device("cpu"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    err = float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))
    return err if math.isfinite(err) else math.inf  # NaN never passes


@pytest.mark.parametrize(
    "shared,capacity,gate",
    [(0, 0.0, False), (1, 0.0, False), (0, 1.0, False), (1, 1.25, False), (1, 0.0, True)],
)
@pytest.mark.parametrize("by", ["tokens", "experts"])
def test_pipeline_matches_plain_path_for_every_chunk_count(shared, capacity, gate, by):
    base = seeded_moe(num_shared_experts=shared, capacity_factor=capacity, shared_gate=gate)
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))
    ref = moe_step(copy.deepcopy(base), x)
    # tokens: 20 > 14 tokens gives empty chunks; experts: 3 chunks of 4 experts are uneven
    for chunks in (1, 2, 3, 4, 20) if by == "tokens" else (1, 2, 3, 4):
        for split in (False, True):
            moe = copy.deepcopy(base)
            moe.overlap = LayerOverlap(0, chunks, split, CPU, chunk_by=by)
            got = moe_step(moe, x)
            assert len(moe.overlap.queue) == 0
            err = max(_rel(a, b) for a, b in zip(got, ref, strict=True))
            assert err < 1e-5, (chunks, split)


@pytest.mark.parametrize("tokens", [1, 2, 5])
def test_shared_experts_split_over_fill_and_drain_match_for_any_token_count(tokens):
    """The shared experts run in two token halves (beside the first dispatch and the last
    combine): one token leaves the first half empty, an odd count splits unevenly; outputs and
    every gradient still equal the plain path's, with dW deferred or not."""
    base = seeded_moe(num_shared_experts=2, shared_gate=True)
    x = torch.randn(1, tokens, 16, generator=torch.Generator().manual_seed(3))
    ref = moe_step(copy.deepcopy(base), x)
    for chunks, split in ((1, True), (2, False), (3, True)):
        moe = copy.deepcopy(base)
        moe.overlap = LayerOverlap(0, chunks, split, CPU)
        got = moe_step(moe, x)
        assert len(moe.overlap.queue) == 0
        assert max(_rel(a, b) for a, b in zip(got, ref, strict=True)) < 1e-5, (chunks, split)


def test_split_dw_shared_experts_run_in_token_halves_whose_dw_is_joined(monkeypatch):
    """With split_dw the shared experts (and their gate) see the first N // 2 tokens, then the
    rest; each weight's dW reaches the queue once, as one task over both halves' rows."""
    from braid.overlap import wgrad

    seen, real = [], wgrad.JoinedWgrad.add
    monkeypatch.setattr(
        wgrad.JoinedWgrad,
        "add",
        lambda self, b, w, x, g: (seen.append((b, id(w), x.flatten(0, -2).shape[0])),
                                  real(self, b, w, x, g))[1],
    )  # fmt: skip
    base = seeded_moe(num_shared_experts=1, shared_gate=True)
    x = torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(4))
    ref = moe_step(copy.deepcopy(base), x)
    moe = copy.deepcopy(base)
    moe.overlap = LayerOverlap(0, 1, True, CPU)  # C = 1: the routed experts queue 2 dW tasks
    queued = []
    real_call = moe.overlap.queue.__class__.__call__
    monkeypatch.setattr(
        moe.overlap.queue.__class__, "__call__", lambda q, t: (queued.append(t), real_call(q, t))
    )
    got = moe_step(moe, x)
    weights = {id(moe.shared.w13.weight), id(moe.shared.w2.weight), id(moe.shared_gate.weight)}
    assert {w for _, w, _ in seen} == weights
    assert sorted((b, n) for b, _, n in seen) == [(0, 3)] * 3 + [(1, 4)] * 3
    assert len(queued) - 2 == 3  # one task per shared weight, not one per half
    assert max(_rel(a, b) for a, b in zip(got, ref, strict=True)) < 1e-5


@pytest.mark.parametrize("by", ["tokens", "experts"])
@pytest.mark.parametrize("fp8,bf16", [(False, False), (False, True), (True, False)])
def test_chunks_share_one_cast_of_each_expert_weight(monkeypatch, fp8, bf16, by):
    """Every chunk calls the experts; the weights are cast (fp8: quantised) once per layer
    forward, not once per chunk, and the results equal the plain path's as before."""
    from braid.ops import fp8 as fp8_ops
    from braid.ops import grouped_gemm
    from braid.ops.fp8_stats import Fp8Stats

    base = seeded_moe()
    if fp8:
        base.experts.fp8_stats = Fp8Stats()
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(2))
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)  # casts that copy
    if bf16:
        base.experts.impl = "loop"  # CPU grouped_mm wants 16-byte strides; F = 12 is not
    with amp:
        ref = moe_step(copy.deepcopy(base), x)
    casts = []
    if fp8:
        real = fp8_ops.quantize_cols
        monkeypatch.setattr(fp8_ops, "quantize_cols", lambda w: (casts.append(w), real(w))[1])
        real_rows = fp8_ops.quantize
        rows = []  # the backward's rowwise weight codes, also once per layer

        def spy(t):  # the expert weights only (other operands also pass through quantize)
            if isinstance(t, torch.nn.Parameter):
                rows.append(t)
            return real_rows(t)

        monkeypatch.setattr(fp8_ops, "quantize", spy)
    else:
        real = grouped_gemm._local
        weight = lambda w: casts.append(w) if isinstance(w, torch.nn.Parameter) else None  # noqa: E731
        monkeypatch.setattr(grouped_gemm, "_local", lambda w: (weight(w), real(w))[1])
    moe = copy.deepcopy(base)
    moe.overlap = LayerOverlap(0, 3, False, CPU, chunk_by=by)
    with amp:
        got = moe_step(moe, x)
    assert len(casts) == 2  # w13 and w2, for all three chunks
    assert not fp8 or len(rows) == 2
    assert moe.experts._casts is None  # nothing is kept past the layer
    assert max(_rel(a, b) for a, b in zip(got, ref, strict=True)) < (2e-2 if bf16 else 1e-5)


def test_pipeline_without_grad_matches_plain_forward():
    base = seeded_moe(num_shared_experts=1)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        ref, _ = copy.deepcopy(base)(x)
        base.overlap = LayerOverlap(0, 3, True, CPU)
        got, _ = base(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_token_bounds_keep_the_first_and_last_chunks_short():
    # C >= 3: weights 1, 2, ..., 2, 1, as chunks of experts (the fill and drain are short)
    assert token_bounds(12, 4) == [(0, 2), (2, 6), (6, 10), (10, 12)]
    assert token_bounds(10, 3) == [(0, 2), (2, 8), (8, 10)]  # 2.5 and 7.5 round to even
    assert token_bounds(1000, 4) == [(0, 167), (167, 500), (500, 833), (833, 1000)]
    assert token_bounds(12, 2) == [(0, 6), (6, 12)] and token_bounds(7, 1) == [(0, 7)]
    assert token_bounds(2, 4) == [(0, 0), (0, 1), (1, 2), (2, 2)]  # N < C: some empty
    assert token_bounds(0, 3) == [(0, 0)] * 3
    for n in range(40):
        for c in range(1, 17):
            bounds = token_bounds(n, c)
            assert len(bounds) == c and bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a <= b for a, b in bounds), (n, c)
            assert all(p[1] == q[0] for p, q in zip(bounds[:-1], bounds[1:], strict=True)), (n, c)
            # each end rounded to the nearest token: each size within one of its exact share
            w = [1] * c if c < 3 else [1] + [2] * (c - 2) + [1]
            for (a, b), wc in zip(bounds, w, strict=True):
                assert abs((b - a) - wc * n / sum(w)) <= 1, (n, c)


def test_expert_bounds_are_those_of_the_old_formula():
    """`expert_bounds` now takes its ends from `fill_drain_ends`: same results as before."""

    def old(num_local, num_chunks):
        w = [1.0 if c in (0, num_chunks - 1) or num_chunks < 3 else 2.0 for c in range(num_chunks)]
        cum, ends = 0.0, []
        for x in w:
            cum += x
            ends.append(round(cum / sum(w) * num_local))
        for c in range(num_chunks):
            ends[c] = max(ends[c], (ends[c - 1] if c else 0) + 1)
        for c in reversed(range(num_chunks - 1)):
            ends[c] = min(ends[c], ends[c + 1] - 1)
        return list(zip([0] + ends[:-1], ends, strict=True))

    for num_local in range(1, 130):
        for num_chunks in range(1, min(num_local, 40) + 1):
            assert expert_bounds(num_local, num_chunks) == old(num_local, num_chunks)


def _model() -> Transformer:
    mc = ModelConfig(dim=32, n_layers=3, n_heads=2, vocab_size=64, ffn_hidden=64, max_seq_len=32)
    model = Transformer(mc, MoEConfig(num_experts=4, top_k=2, expert_hidden=16))
    init_weights(model, 0, 0.02, 3)
    return model


def test_session_leaves_the_plain_path_untouched_when_overlap_is_off():
    model = _model()
    s = OverlapSession.install(
        model, OverlapConfig(), device=torch.device("cpu"), tokens_per_rank=32, dtype=torch.float32
    )
    assert s.layers == {} and all(m.overlap is None for m in model.moe_modules().values())
    s.begin_step(1)
    assert s.end_step(1) == {} and s.flush() == 0


def _traced_session(model, cfg, run_dir, lines: list, **kw) -> OverlapSession:
    """A CPU session of the tiny model whose traces go to `run_dir` and log lines to `lines`."""
    return OverlapSession.install(
        model,
        cfg,
        device=torch.device("cpu"),
        tokens_per_rank=32,
        dtype=torch.float32,
        run_dir=run_dir,
        log=lines.append,
        **kw,
    )


def test_session_reports_metrics_and_writes_a_chrome_trace(tmp_path):
    model, lines = _model(), []
    cfg = OverlapConfig(chunks="auto", split_dw=True, report=True, trace_step=2, max_chunks=4)
    s = _traced_session(model, cfg, tmp_path, lines, log_every=2)
    assert any(line.startswith("overlap plan moe1: chunks=") for line in lines)
    idx = torch.randint(0, 64, (2, 16))
    for step in (1, 2):
        s.begin_step(step)
        for _ in range(2):  # two micro-steps
            model(idx).logits.square().mean().backward()
        assert s.flush() == 0  # the flush points already ran everything
        metrics = s.end_step(step)
    assert metrics, "step 2 is a log step: it is timed"
    for i in model.moe_layers:
        for name in ("exposed_ms", "exchange_ms", "measured_ms", "predicted_ms"):
            assert f"overlap/{name}/layer{i}" in metrics
        assert metrics[f"overlap/measured_ms/layer{i}"] > 0
    assert any(line.startswith("overlap @ step 2") for line in lines)
    assert any(line.startswith("overlap: Chrome trace of step 2 written to") for line in lines)
    trace = json.loads((tmp_path / "overlap_trace_step2_rank0.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    for kind in ("dispatch_a2a", "experts", "combine_a2a", "experts_bwd", "dW_flush"):
        assert f"moe1/{kind}" in names, kind  # one process: exchanges never in flight, so the
        # dW waits for the flush point


def test_a_trace_that_could_not_be_written_is_not_reported_as_written(tmp_path):
    model, lines = _model(), []
    (tmp_path / "afile").write_text("a file where the run directory should be")
    s = _traced_session(model, OverlapConfig(trace_step=1), tmp_path / "afile", lines)
    s.begin_step(1)
    model(torch.randint(0, 64, (2, 16))).logits.square().mean().backward()
    s.flush()
    s.end_step(1)
    assert any(ln.startswith("warning: overlap: could not write the Chrome trace") for ln in lines)
    assert not any("written to" in ln for ln in lines)


def test_chunked_path_under_bf16_autocast_is_bitwise_the_plain_path_with_one_chunk():
    """fp32 residual, bf16 GEMMs: rows travel in bf16 both ways and each token's input grad is
    summed over its copies in fp32 and rounded once, as the plain path does (C = 1 groups the
    GEMMs identically, so everything is bitwise equal; C > 1 regroups the GEMM rows only)."""
    base = MoE(ModelConfig(dim=16), MoEConfig(num_experts=4, top_k=2, expert_hidden=16))
    with torch.no_grad():  # bf16 grouped GEMMs want 16-byte rows: widths that are multiples of 8
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)) * 0.3)
    x = torch.randn(3, 9, 16, generator=torch.Generator().manual_seed(5))

    def run(moe):
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = moe(xx)
        y.float().square().sum().backward()
        if moe.overlap is not None:
            moe.overlap.flush()
        return [y, xx.grad] + [p.grad for p in moe.parameters()]

    ref = run(copy.deepcopy(base))
    moe = copy.deepcopy(base)
    moe.overlap = LayerOverlap(0, 1, False, CPU)
    for got, want in zip(run(moe), ref, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
