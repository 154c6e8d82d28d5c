"""The planner's cost model picks the chunk count with the lowest predicted time (pure tests)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from braid.overlap.measure import fit, fit_line
from braid.overlap.planner import CostModel, LayerShape, choose_chunks, predict_ms
from unit_costs import pass_flops, unit_cost_model, wire_bytes

# A layer whose full dispatch moves exactly 1e6 bytes across ranks and whose expert pass
# (forward) is exactly 1e9 FLOPs, so per-byte and per-FLOP costs read as "ms per full layer".
SHAPE = LayerShape(tokens=1000, dim=125, hidden=1333, top_k=2, num_experts=8, ep=4, elem_bytes=4)
WIRE, FLOPS = wire_bytes(SHAPE), pass_flops(SHAPE)  # bytes per dispatch, one expert pass


def model(lat=0.05, x_ms=1.0, call=0.01, e_ms=2.0, kappa=0.0) -> CostModel:
    return unit_cost_model(SHAPE, lat, x_ms, call, e_ms, kappa)


def test_three_stage_formula_matches_the_hand_derivation():
    # 1200 tokens, so that the chunks of C = 4 (200, 400, 400, 200 tokens) and C = 6 are exact
    # fractions. Chunk c of fraction f: x = 0.05 + f, e = 0.02 + 2f (kappa 0: both = max).
    # T = x_0 + x_{C-1} + sum_c max(e_c, x_{c+1} + x_{c-1}) (no neighbour: 0); the backward
    # pipes dX + dW = 2e the same way.
    # C = 1: x = 1.05, e = 2.02. Forward 2.1 + 2.02 = 4.12, backward 2.1 + 4.04 = 6.14: 10.26.
    # C = 2: x = 0.55, e = 1.02, each chunk's compute beside one exchange (0.55) of the other.
    #   Forward 1.1 + 2 * 1.02 = 3.14, backward 1.1 + 2 * 2.04 = 5.18: 8.32.
    # C = 4, fractions 1/6, 1/3, 1/3, 1/6: x = 13/60, 23/60, 23/60, 13/60 (0.2167, 0.3833);
    #   e = 0.02 + 1/3, 0.02 + 2/3 (0.3533, 0.6867); links beside chunks 0..3: 23/60, 0.6,
    #   0.6, 23/60. Forward: 26/60 + 2 * 23/60 (the link, over e_0 = e_3) + 2 * (0.02 + 2/3)
    #   = 0.24 + 7/3 = 2.5733. Backward: 26/60 + 2 * (0.04 + 2/3) + 2 * (0.04 + 4/3)
    #   (compute over every link) = 0.26 + 13/3 = 4.5933. Sum 0.5 + 20/3 = 7.1667.
    # The runner-up, C = 6 (fractions 1/10, 1/5 x 4, 1/10; x = 0.15, 0.25; e = 0.22, 0.42):
    #   forward 0.3 + 0.25 + 0.42 + 0.5 + 0.5 + 0.42 + 0.25 = 2.64, backward 0.3 + 2 * 0.44
    #   + 4 * 0.84 = 4.54: 7.18. So C = 4 is the best candidate.
    shape = replace(SHAPE, tokens=1200)
    m = unit_cost_model(shape)
    for c, want in ((1, 10.26), (2, 8.32), (4, 0.5 + 20 / 3), (6, 7.18)):
        assert predict_ms(shape, c, False, m) == pytest.approx(want)
    best, predicted, table = choose_chunks(shape, False, m)
    assert best == 4 and predicted == pytest.approx(0.5 + 20 / 3)
    assert set(table) >= {1, 2, 3, 4, 6, 8}


def test_fitted_model_from_synthetic_measurements_picks_the_known_optimum():
    truth = model()
    samples = {"a2a": [], "gemm": []}
    for f in (1, 2, 4, 8):  # what `measure` times: each chunk size, noise-free
        samples["a2a"].append((WIRE / f, truth.exchange_ms(WIRE / f, SHAPE.ep)))
        samples["gemm"].append((FLOPS / f, truth.gemm_ms(FLOPS / f, calls=2)))
    alone = (truth.gemm_ms(FLOPS, 2), truth.exchange_ms(WIRE, SHAPE.ep))
    fitted = fit(samples, both_ms=max(alone) + 0.25 * min(alone), alone=alone)
    assert fitted.a2a_latency_ms == pytest.approx(0.05)
    assert fitted.gemm_latency_ms == pytest.approx(0.01)
    assert fitted.interference == pytest.approx(0.25)
    assert (
        choose_chunks(SHAPE, False, fitted)[0]
        == choose_chunks(SHAPE, False, CostModel(**{**truth.__dict__, "interference": 0.25}))[0]
    )


def test_no_expert_parallelism_means_no_chunking():
    shape = LayerShape(**{**SHAPE.__dict__, "ep": 1})
    assert choose_chunks(shape, False, model())[0] == 1
    assert choose_chunks(shape, True, model())[0] == 1


def test_large_exchange_latency_means_no_chunking():
    assert choose_chunks(SHAPE, False, model(lat=5.0))[0] == 1


def test_full_interference_means_no_chunking():
    assert choose_chunks(SHAPE, False, model(kappa=1.0))[0] == 1


def test_costly_per_chunk_dw_accumulation_means_no_chunking():
    m = CostModel(**{**model().__dict__, "dw_accumulate_ms": 2.0})
    assert choose_chunks(SHAPE, False, m)[0] == 1


def test_free_chunks_and_balanced_stages_pick_the_largest_chunk_count():
    m = model(lat=0.0, call=0.0, x_ms=1.0, e_ms=2.0)
    assert choose_chunks(SHAPE, False, m, candidates=(1, 2, 4, 8))[0] == 8


def test_no_more_chunks_than_tokens_are_considered():
    """Where chunking pays (free chunks, balanced stages), a layer of 6 tokens per rank gets
    at most 6 chunks: larger candidates are not costed (a chunk of tokens needs a token)."""
    m = model(lat=0.0, call=0.0, x_ms=1.0, e_ms=2.0)
    best, _, table = choose_chunks(replace(SHAPE, tokens=6), False, m)
    assert set(table) == {1, 2, 3, 4, 6} and best in (4, 6)  # 4 and 6 tie: the smaller


def test_split_dw_hides_weight_grads_in_idle_exchange_time():
    m = model()
    for c in (1, 2, 4):
        assert predict_ms(SHAPE, c, True, m) < predict_ms(SHAPE, c, False, m)
    # without exchanges there is no window: the split changes nothing
    shape = LayerShape(**{**SHAPE.__dict__, "ep": 1})
    assert predict_ms(shape, 1, True, m) == pytest.approx(predict_ms(shape, 1, False, m))


def test_fit_line_recovers_a_line_and_clamps_negative_parts():
    assert fit_line([1, 2, 3], [3, 5, 7]) == pytest.approx((1.0, 2.0))
    assert fit_line([1, 2, 3], [3, 2, 1])[1] == 0.0  # a falling cost is noise: slope 0


def test_chunking_must_beat_the_plain_path_by_the_margin():
    # Almost nothing to hide (exchanges 1% of the GEMMs): every C > 1 is predicted within the
    # margin of C = 1, so the plain path is kept even where a chunked C is nominally faster.
    from braid.overlap.planner import PLAN_MARGIN

    m = model(lat=0.0, x_ms=0.02, call=0.0, e_ms=2.0)
    _, _, table = choose_chunks(SHAPE, False, m)
    assert min(table.values()) < table[1]  # a chunked schedule is nominally faster ...
    assert min(table.values()) > table[1] * (1 - PLAN_MARGIN)  # ... but within the margin
    assert choose_chunks(SHAPE, False, m)[0] == 1


def test_measured_non_gemm_work_is_added_once_per_layer_and_per_chunk():
    base, m = model(), replace(model(), overhead_ms=3.0, overhead_per_chunk_ms=0.5)
    for c in (1, 2, 4):
        for split in (False, True):
            got, want = predict_ms(SHAPE, c, split, m), predict_ms(SHAPE, c, split, base)
            assert got == pytest.approx(want + 3.0 + 0.5 * c)
    # A large per-chunk cost (kernel launches, index math of every chunk) keeps the plain path.
    assert choose_chunks(SHAPE, False, replace(base, overhead_per_chunk_ms=5.0))[0] == 1


def test_compressed_dispatch_shortens_the_forward_only():
    m = model()
    half = replace(m, dispatch_factor=0.5)
    for c in (1, 2, 4):
        gain = predict_ms(SHAPE, c, False, m) - predict_ms(SHAPE, c, False, half)
        assert 0 < gain <= 0.5 * _chunk_x(c) * c + 1e-9  # at most half of each chunk's dispatch


def _chunk_x(c: int) -> float:
    """One chunk's exchange under `model()`: latency + its share of the 1 ms full exchange."""
    return 0.05 + 1.0 / c


def test_measure_on_a_real_dispatcher_and_a_compressing_exchange():
    import torch

    from braid.exchange import get_exchange
    from braid.exchange.config import ExchangeConfig
    from braid.model.config import ModelConfig
    from braid.moe.config import MoEConfig
    from braid.moe.layer import MoE
    from braid.overlap.measure import measure
    from braid.overlap.session import layer_shape

    moe = MoE(ModelConfig(dim=64), MoEConfig(num_experts=8, top_k=2, expert_hidden=32))
    cfg = ExchangeConfig(
        algorithm="simulated", compressor="int8", simulate_gbps=0.01, simulate_latency_us=5
    )
    moe.dispatcher.exchange = get_exchange("simulated")(None, None, cfg)
    shape = layer_shape(moe, 256, torch.float32)
    assert shape.ep == 4  # the simulated exchange's ranks
    # fp32 parameters under bf16 autocast: an fp32 stream dispatched, bf16 combined; a bf16
    # stream (model.residual = "compute") both ways.
    assert layer_shape(moe, 256, torch.bfloat16).elem_bytes == 3
    assert layer_shape(moe, 256, torch.bfloat16, torch.bfloat16).elem_bytes == 2
    m = measure(
        shape,
        moe.dispatcher.exchange,
        moe.experts,
        torch.device("cpu"),
        torch.float32,
        reps=3,
        dispatcher=moe.dispatcher,
    )
    assert m.overhead_ms + m.overhead_per_chunk_ms > 0  # the token-side work was timed
    # int8 rows are about a quarter of fp32 rows: the simulated dispatch is clearly faster,
    # the uncompressed combine about as fast as the exact move.
    assert m.dispatch_factor < 0.7 and 0.5 < m.combine_factor < 2.0


def test_split_dw_shared_expert_halves_hide_beside_the_first_dispatch_and_the_last_combine():
    # C = 1, no interference: each exchange x = 0.05 + 1 = 1.05, the experts' pass e = 2.02.
    # Shared experts of hidden 2666 (the routed pass's width): S = 2.02, each token half 1.02.
    # Forward with split_dw: S0 beside the dispatch, S1 beside the combine, each shorter than
    # its exchange: nothing added (S whole beside the dispatch alone would add 2.02 - 1.05).
    # Backward: S's dX beside Bg0 adds 0.97 (t = 4.12 + 0.97 = 5.09); the idle time left,
    # 5.09 - 2.02 - 2.02 = 1.05, hides that much of the dW (2.02 + 2.02): 5.09 + 2.99 = 8.08
    # against 4.12 without shared experts.
    m = model()
    shared = replace(SHAPE, shared_hidden=2666)
    assert predict_ms(shared, 1, True, m) - predict_ms(SHAPE, 1, True, m) == pytest.approx(3.96)
    # without split_dw, C = 1 is the plain path: S after the combine, nothing overlapped
    assert predict_ms(shared, 1, False, m) - predict_ms(SHAPE, 1, False, m) == pytest.approx(
        2.02 + 4.04
    )
    # C = 2 without split_dw: S whole beside the first dispatch (x = 0.05 + 0.5 = 0.55 a
    # chunk), 2.02 - 0.55 more in the forward; its dX + dW beside Bg0: 4.04 - 0.55
    c2 = predict_ms(shared, 2, False, m) - predict_ms(SHAPE, 2, False, m)
    assert c2 == pytest.approx(2.02 - 0.55 + 4.04 - 0.55)


def test_joined_chunk_dw_replaces_the_per_chunk_adds_by_one_add_and_a_gather():
    """With split_dw, chunks of tokens whose dW is joined (`overlap.chunk_dw`) pay one add
    plus the gather of the operands instead of C adds (the gather at its measured rate, or at
    the add's bandwidth, 12 bytes a parameter, when none was measured); the joined dW hides in
    the last window only. Without split_dw "joined" costs the same work (all of it in the last
    chunk's backward) and "auto" keeps the C adds; with split_dw "auto" takes the cheaper by
    bytes."""
    from braid.overlap.joined_experts import ADD_BYTES

    shape = LayerShape(**{**SHAPE.__dict__, "ep": 4, "local_experts": 2})
    numel = 3 * 2 * shape.dim * shape.hidden
    gather = 4.0 * shape.tokens * shape.top_k * (2 * shape.dim + 3 * shape.hidden)
    for rate in (0.0, 3e-7):  # unmeasured (the add's bandwidth), measured
        # interference 1: nothing hides, so the difference is all of the dW work saved
        m = CostModel(
            **{**model(kappa=1.0).__dict__, "dw_accumulate_ms": 2.0, "gather_ms_per_byte": rate}
        )
        gather_ms = gather * (rate or 2.0 / (ADD_BYTES * numel))
        for C in (2, 4, 8):
            per = predict_ms(shape, C, True, m, chunk_dw="per_chunk")
            joined = predict_ms(shape, C, True, m, chunk_dw="joined")
            assert per - joined == pytest.approx((C - 1) * 2.0 - gather_ms), (rate, C)
            auto = predict_ms(shape, C, True, m, chunk_dw="auto")
            assert auto == (joined if gather < (C - 1) * ADD_BYTES * numel else per)
            no_split = predict_ms(shape, C, False, m, chunk_dw="per_chunk")
            no_split_joined = predict_ms(shape, C, False, m, chunk_dw="joined")
            assert no_split - no_split_joined == pytest.approx((C - 1) * 2.0 - gather_ms)
            assert predict_ms(shape, C, False, m, chunk_dw="auto") == no_split
    # perfect overlap and free adds: per chunk, the dW fills every window; joined, only the
    # last, so it is predicted slower though its work is the same
    m = CostModel(**{**model().__dict__, "dw_accumulate_ms": 0.0, "gather_ms_per_byte": 0.0})
    assert predict_ms(shape, 4, True, m, chunk_dw="joined") > predict_ms(
        shape, 4, True, m, chunk_dw="per_chunk"
    )
    # at C = 1 nothing is joined
    assert predict_ms(shape, 1, True, m, chunk_dw="joined") == predict_ms(shape, 1, True, m)


def test_a_fused_join_costs_one_add_and_no_gather():
    """Where the joined dW reads the chunks in place (`CostModel.fused_join`: the Triton
    kernel), it costs one add whatever the gather rate, and "auto" joins even where a gather
    would cost more than the per-chunk adds (the same model gathering is far slower), with
    and without split_dw."""
    shape = LayerShape(**{**SHAPE.__dict__, "ep": 4, "local_experts": 2})
    slow = {**model(kappa=1.0).__dict__, "dw_accumulate_ms": 2.0, "gather_ms_per_byte": 1.0}
    m = CostModel(**{**slow, "fused_join": True})
    for C in (2, 4, 8):
        per = predict_ms(shape, C, True, m, chunk_dw="per_chunk")
        joined = predict_ms(shape, C, True, m, chunk_dw="joined")
        assert per - joined == pytest.approx((C - 1) * 2.0), C
        assert predict_ms(shape, C, True, m, chunk_dw="auto") == joined
        gathering = predict_ms(shape, C, True, CostModel(**slow), chunk_dw="joined")
        assert gathering > per + 1e3, C
        per = predict_ms(shape, C, False, m, chunk_dw="per_chunk")
        assert per - predict_ms(shape, C, False, m, chunk_dw="auto") == pytest.approx((C - 1) * 2.0)


@pytest.mark.parametrize(
    "sets,distributed,wire",
    [
        ([], False, 3),  # fp32 stream dispatched, bf16 combined
        (["--model.residual=compute"], False, 2),
        (["--parallel.param_dtype=bf16"], True, 2),  # FSDP's bf16 parameters
        (["--parallel.param_dtype=bf16"], False, 3),  # one process: no FSDP units
    ],
)
def test_the_session_plans_the_stream_s_dispatch_in_its_dtype(sets, distributed, wire, monkeypatch):
    import torch

    from braid.config import load_config
    from braid.overlap import session as session_mod
    from braid.parallel.mesh import ParallelContext
    from braid.train.loss import stream_dtype
    from braid.train.model_setup import build_model

    base = [
        "--model.dim=32",
        "--model.n_heads=2",
        "--model.n_layers=2",
        "--moe.expert_hidden=16",
        "--exchange.algorithm=simulated",
        "--overlap.chunks=2",
        "--train.dtype=bf16",
    ]
    cpu = ParallelContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    model = build_model(load_config(None, base), cpu)  # param_dtype needs torchrun to build
    cfg = load_config(None, base + sets)
    shapes = []
    real = session_mod.layer_shape
    monkeypatch.setattr(
        session_mod, "layer_shape", lambda *a: shapes.append(real(*a)) or shapes[-1]
    )
    stream = stream_dtype(cfg, cpu.device, distributed)
    kw = dict(device=cpu.device, tokens_per_rank=32, dtype=torch.bfloat16, stream=stream)
    session_mod.OverlapSession.install(model, cfg.overlap, **kw)
    assert shapes and {s.elem_bytes for s in shapes} == {wire}
