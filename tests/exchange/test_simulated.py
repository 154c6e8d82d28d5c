"""The simulated exchange: the local exchange's results, bit for bit, in a real exchange's time.

On CPU a movement completes at a host-clock deadline, so these tests check the model's time,
the serialisation of movements on the one link, and that the overlap engine fills its windows
and reports its time, all through the `Handle` contract. The CUDA path (a copy of the bytes
that would leave the rank, then a sleep kernel, on the exchange's own stream) runs in
`benchmarks/overlap_sim.py`; `test_cuda_movement_takes_the_modelled_time` checks it on a GPU.
"""

from __future__ import annotations

import copy
import statistics
import time

import pytest
import torch

from braid.errors import BraidError
from braid.exchange import get_exchange
from braid.exchange.config import ExchangeConfig
from braid.exchange.simulated import (
    MAX_GAP_MS,
    NVLINK_H200X4,
    LaunchGap,
    SimulatedExchange,
    simulated_ms,
)
from braid.overlap.engine import LayerOverlap
from braid.overlap.streams import Clock
from small_moe import moe_step, seeded_moe

MiB = 2**20


def test_model_time_follows_the_measured_table():
    cfg = ExchangeConfig(algorithm="simulated")
    assert simulated_ms(1024, cfg) == pytest.approx(0.040)  # the latency floor
    assert simulated_ms(0, cfg) == pytest.approx(0.040)
    for nbytes, gbps in NVLINK_H200X4:
        assert simulated_ms(nbytes, cfg) == pytest.approx(nbytes / (gbps * 1e9) * 1e3)
    mid = [simulated_ms(n * MiB, cfg) for n in (8, 16, 64, 128, 256, 1024)]
    assert mid == sorted(mid)  # longer for more bytes
    rate = [n * MiB / t for n, t in zip((8, 16, 64, 128, 256), mid, strict=False)]
    assert rate == sorted(rate)  # and faster per byte for larger messages, as measured
    flat = ExchangeConfig(algorithm="simulated", simulate_gbps=2.0, simulate_latency_us=10)
    assert simulated_ms(4 * 10**6, flat) == pytest.approx(2.0)


@pytest.mark.parametrize("shared,capacity", [(1, 0.0), (0, 1.0)])
def test_layer_outputs_and_grads_are_bitwise_the_local_exchanges(shared, capacity):
    base = seeded_moe(num_shared_experts=shared, capacity_factor=capacity)
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))
    # (chunks, split, chunk_by, simulated ranks): chunks of experts need the experts on one
    # simulated rank (its chunks divide the experts per rank of the group it stands for).
    for chunks, split, by, ranks in (
        (None, False, "auto", 4), (1, False, "auto", 4), (3, True, "tokens", 4),
        (3, True, "experts", 1),
    ):  # fmt: skip
        fast = ExchangeConfig(
            algorithm="simulated", simulate_gbps=1000.0, simulate_latency_us=1, simulate_ranks=ranks
        )
        ref, sim = copy.deepcopy(base), copy.deepcopy(base)
        sim.dispatcher.exchange = get_exchange("simulated")(None, None, fast)
        for m in (ref, sim):
            if chunks is not None:
                m.overlap = LayerOverlap(0, chunks, split, Clock(torch.device("cpu")), chunk_by=by)
        for a, b in zip(moe_step(sim, x), moe_step(ref, x), strict=True):
            assert torch.equal(a, b), (chunks, split, by)


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_chunks_follow_the_experts_per_rank_of_the_group_it_stands_for(monkeypatch, ranks):
    # One process holds all 8 experts, but a rank of the simulated W-rank group holds 8 / W:
    # "auto" cuts experts only where that rank could (C <= 8 / W), tokens beyond, and
    # "experts" past it is refused as on the real group. The local exchange keeps all 8.
    moe = seeded_moe(num_experts=8)
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))
    cfg = ExchangeConfig(
        algorithm="simulated", simulate_gbps=1000.0, simulate_latency_us=1, simulate_ranks=ranks
    )
    assert moe.dispatcher.chunk_local == 8  # the local exchange
    moe.dispatcher.exchange = get_exchange("simulated")(None, None, cfg)
    assert moe.dispatcher.num_local == 8 and moe.dispatcher.chunk_local == 8 // ranks
    seen: list[tuple[int, str]] = []
    plan = moe.dispatcher.plan
    monkeypatch.setattr(
        moe.dispatcher,
        "plan",
        lambda idx, c=1, by="tokens": seen.append((c, by)) or plan(idx, c, by),
    )
    for chunks in (2, 4):
        moe.overlap = LayerOverlap(0, chunks, True, Clock(torch.device("cpu")))
        moe_step(moe, x)
    L = 8 // ranks
    assert seen == [(c, "experts" if c <= L else "tokens") for c in (2, 4)], seen
    moe.overlap = LayerOverlap(0, 4, True, Clock(torch.device("cpu")), chunk_by="experts")
    if L >= 4:
        moe_step(moe, x)
    else:
        with pytest.raises(ValueError, match=f"chunks=4 is more than the {L} experts per rank"):
            moe_step(moe, x)


@pytest.mark.parametrize("by, chunks", [("tokens", 1), ("tokens", 2), ("experts", 2)])
def test_plans_pay_the_count_exchange_of_the_ranks_it_stands_in_for(monkeypatch, by, chunks):
    """A real group's dropless plan exchanges counts and reads the splits on the host; the
    local exchange (one rank) needs neither; the simulated one pays both, as its ranks do."""
    moe = seeded_moe()  # no shared expert
    fast = ExchangeConfig(algorithm="simulated", simulate_gbps=1000.0, simulate_latency_us=1)
    sim = get_exchange("simulated")(None, None, fast)
    calls, reads = [], []
    real_counts = sim.exchange_counts
    monkeypatch.setattr(sim, "exchange_counts", lambda c: calls.append(c.shape) or real_counts(c))
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or real_tolist(t))
    topk = torch.randint(0, 4, (9, 2), generator=torch.Generator().manual_seed(2))
    want = moe.dispatcher.plan(topk, chunks, by)  # the local exchange
    local_reads = len(reads)
    moe.dispatcher.exchange = sim
    got = moe.dispatcher.plan(topk, chunks, by)
    assert calls == [torch.Size([1, chunks * 4 if by == "tokens" else 4])]
    assert len(reads) - local_reads == 1  # one host read for every chunk's splits
    assert local_reads == (1 if by == "experts" else 0)  # chunk sizes of experts are data
    for a, b in zip(got.routes, want.routes, strict=True):
        assert (a.send, a.recv) == (b.send, b.recv) and torch.equal(a.order_M, b.order_M)


def test_movements_take_the_modelled_time_one_after_another():
    cfg = ExchangeConfig(algorithm="simulated", simulate_gbps=1.0, simulate_latency_us=40)
    ex = SimulatedExchange(cfg=cfg)
    x = torch.zeros(5 * 10**7, dtype=torch.uint8)  # 50 MB at 1 GB/s: 50 ms
    t0 = time.perf_counter()
    h1, h2 = ex.move(x, [1], [1]), ex.move(x, [1], [1])
    assert not h1.done() and not h2.done()
    assert h1.wait() is x  # the local exchange's rows: the input itself
    assert h1.done() and not h2.done()  # the second waits for the link
    h2.wait()
    assert time.perf_counter() - t0 >= 0.1
    assert h1.elapsed_ms() == pytest.approx(50.0) and h2.elapsed_ms() == pytest.approx(50.0)


def test_engine_fills_simulated_windows_and_reports_their_time():
    moe = seeded_moe(num_shared_experts=1)
    slow = ExchangeConfig(algorithm="simulated", simulate_gbps=0.001, simulate_latency_us=500)
    moe.dispatcher.exchange = get_exchange("simulated")(None, None, slow)
    moe.overlap = lo = LayerOverlap(0, 2, True, Clock(torch.device("cpu")))
    lo.timeline.timing = True
    moe_step(moe, torch.randn(2, 8, 16))
    row = lo.timeline.summary()
    assert lo.queue.num_drained > 0  # dW ran while movements were in flight
    assert row["exchange_ms"] >= 8 * 0.5  # 8 movements of at least the latency each
    assert row["exposed_ms"] > 0  # C=2 cannot hide movements this slow


def test_refused_with_process_groups_and_installed_in_one_process():
    with pytest.raises(BraidError, match="exchange.algorithm=simulated runs in one process"):
        SimulatedExchange(object(), object())
    from braid.config import load_config
    from braid.parallel.distributed import init_parallel
    from braid.train.model_setup import build_model

    cfg = load_config(
        None,
        [
            "--model.dim=32",
            "--model.n_layers=2",
            "--model.n_heads=2",
            "--model.vocab_size=64",
            "--model.ffn_hidden=64",
            "--moe.first_k_dense=0",
            "--exchange.algorithm=simulated",
            "--exchange.simulate_ranks=8",
            "--train.device=cpu",
        ],
    )
    model = build_model(cfg, init_parallel(cfg))
    exchanges = {id(m.dispatcher.exchange) for m in model.moe_modules().values()}
    (ex,) = [m.dispatcher.exchange for m in model.moe_modules().values()][:1]
    assert len(exchanges) == 1 and isinstance(ex, SimulatedExchange)
    assert ex.size == 1 and ex.traffic_ranks == 8


def test_launch_gap_is_a_median_that_one_outlier_does_not_set():
    """The spin's launch time on idle streams: nothing until three samples are in, then the
    median of the recent ones, each capped. An outlier first sample (the first movement after
    calibration) once set a running mean at the cap, which then took every small movement's
    spin off, so no later sample could correct it (seen on an H100: 60 us movements took
    23 us)."""
    g = LaunchGap(keep=5, need=3)
    g.observe(0.5, 0.004)  # the outlier: capped
    assert g.samples[-1] == MAX_GAP_MS and g.ms == 0.0 and g.shorten(0.0) == 0.0
    g.observe(0.015, 0.004)
    assert g.ms == 0.0  # two samples: not yet used
    g.observe(0.001, 0.004)  # no gap (the copy hid the launch): nothing learned
    g.observe(0.016, 0.004)
    assert g.ms == pytest.approx(0.020)  # median of 0.1, 0.019, 0.020
    for _ in range(4):
        g.observe(0.014, 0.004)
    assert g.ms == pytest.approx(0.018)  # the outlier has left the window
    assert g.shorten(0.005) == pytest.approx(0.013)  # what a 5 us copy does not hide
    assert g.shorten(0.030) == 0.0  # a long copy hides it all


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("high", [False, True])
def test_exchange_high_priority_puts_the_movements_on_a_high_priority_stream(high):
    """`exchange.high_priority`: the exchange's own stream has the device's greatest priority
    (off: the default 0), and a movement still takes the model's time on it."""
    cfg = ExchangeConfig(algorithm="simulated", high_priority=high)
    ex = SimulatedExchange(cfg=cfg)
    x = torch.randn(8 * MiB // 2, dtype=torch.bfloat16, device="cuda")
    ex.move(x, [1], [1]).wait()
    torch.cuda.synchronize()
    want = torch.cuda.Stream.priority_range()[1] if high else 0
    assert ex._stream.priority == want
    assert want != 0 or not high  # the device has priorities to give


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_movement_takes_the_modelled_time():
    """A 64 MiB movement takes the model's time, issued behind queued work (the host ahead, as
    in training) or onto idle streams (the host's issue then shows: a looser bound)."""
    cfg = ExchangeConfig(algorithm="simulated")
    ex = SimulatedExchange(cfg=cfg)
    x = torch.randn(64 * MiB // 2, dtype=torch.bfloat16, device="cuda")  # 64 MiB
    want = simulated_ms(64 * MiB, cfg)

    def timed(queued: bool) -> float:
        if queued:
            torch.cuda._sleep(1_000_000)  # the caller's stream busy at the issue
        h = ex.move(x, [1], [1])
        assert h.wait() is x
        torch.cuda.synchronize()
        return h.elapsed_ms()

    for _ in range(2):  # calibrates, and warms the host's first calls
        timed(False)
    queued = [timed(True) for _ in range(5)]
    idle = [timed(False) for _ in range(5)]
    assert statistics.median(queued) == pytest.approx(want, rel=0.05), queued
    assert statistics.median(idle) == pytest.approx(want, rel=0.15), idle


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_small_cuda_movements_on_an_idle_stream_learn_the_spin_launch():
    """A movement whose copy is shorter than the spin kernel's launch leaves the stream idle
    between the two; the exchange learns that launch time from finished sampled movements
    (start, after-copy and end events) and shortens later spins by it, so they keep their
    modelled time, whether they mark their copy's end (sampled) or not. The caller's stream is
    idle at every issue here (synchronized), the case where the gap shows."""
    cfg = ExchangeConfig(algorithm="simulated", simulate_latency_us=60.0)
    ex = SimulatedExchange(cfg=cfg)
    x = torch.randn(4096, dtype=torch.bfloat16, device="cuda")  # 8 KiB: a copy of ~1 us
    got = []
    for _ in range(48):
        h = ex.move(x, [1], [1])
        h.wait()
        torch.cuda.synchronize()
        got.append(h.elapsed_ms())
    assert ex._idle_issues == 48  # every issue seen idle
    assert len(ex.launch.samples) >= 3 and 0 < ex.launch.ms <= 0.1  # learned, within the cap
    late = range(24, 48)  # issues 25-48: sampled at 32, 40 and 48, the rest not
    sampled = [got[i] for i in late if (i + 1) % 8 == 0]
    unsampled = [got[i] for i in late if (i + 1) % 8]
    assert statistics.median(unsampled) == pytest.approx(0.060, abs=0.010), got
    assert statistics.median(sampled) == pytest.approx(0.060, abs=0.010), got


def test_move_into_receives_the_rows_in_the_callers_buffer():
    """`move_into` (chunks of experts receive into one buffer's rows): the same rows as `move`,
    in `out` itself, nothing written around it, the handle's time as `move`'s."""
    from braid.exchange.config import ExchangeConfig
    from braid.exchange.simulated import SimulatedExchange

    ex = SimulatedExchange(cfg=ExchangeConfig(algorithm="simulated", simulate_latency_us=1.0))
    x = torch.randn(6, 3)
    buf = torch.full((8, 3), 7.0)
    h = ex.move_into(x, [6], [6], buf[1:7])
    got = h.wait()
    assert got.data_ptr() == buf[1:7].data_ptr() and torch.equal(got, x)
    assert buf[0].eq(7).all() and buf[7].eq(7).all()
    assert h.elapsed_ms() == ex.move(x, [6], [6]).elapsed_ms()


@pytest.mark.parametrize("ranks", [2, 4])
def test_the_session_plans_chunks_of_experts_against_the_groups_experts_per_rank(
    monkeypatch, ranks
):
    # OverlapSession.install decides the axis (and the planner's candidates) as the layer
    # does: 8 experts on 4 simulated ranks are 2 a rank, so 4 chunks of experts are refused
    # at install, and "auto" with chunk_by="experts" plans at most 2.
    from braid.config import load_config
    from braid.overlap.session import OverlapSession
    from braid.parallel.mesh import ParallelContext
    from braid.train.model_setup import build_model

    cpu = ParallelContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    base = ["--model.dim=32", "--model.n_layers=2", "--model.n_heads=2", "--model.vocab_size=64"]
    base += ["--model.ffn_hidden=32", "--model.max_seq_len=16", "--train.seq_len=8"]
    base += ["--train.device=cpu", "--moe.layers=[1]", "--moe.num_experts=8"]
    base += ["--moe.expert_hidden=16", "--exchange.algorithm=simulated"]
    base += [f"--exchange.simulate_ranks={ranks}", "--overlap.chunk_by=experts"]
    kw = dict(device=cpu.device, tokens_per_rank=16, dtype=torch.float32, log=lambda s: None)
    cfg = load_config(None, [*base, "--overlap.chunks=4"])
    model = build_model(cfg, cpu)
    if ranks == 4:
        with pytest.raises(ValueError, match="chunks=4 is more than the 2 experts per rank"):
            OverlapSession.install(model, cfg.overlap, **kw)
    else:
        assert OverlapSession.install(model, cfg.overlap, **kw).layers[1].chunks == 4
    import braid.overlap.session as session_module

    seen = []
    choose = session_module.choose_chunks

    def spy(shape, split, cost, cands, axis, chunk_dw):
        seen.append((cands, [axis(c) for c in cands]))
        return choose(shape, split, cost, cands, axis, chunk_dw)

    monkeypatch.setattr(session_module, "choose_chunks", spy)
    cfg = load_config(None, [*base, "--overlap.chunks=auto", "--overlap.trial_steps=0"])
    OverlapSession.install(build_model(cfg, cpu), cfg.overlap, **kw)
    ((cands, axes),) = seen
    assert max(cands) == 8 // ranks and set(axes[1:]) == {"experts"}, seen


def test_high_priority_group_options_only_for_nccl_with_the_knob():
    """`exchange.high_priority` reaches process-group options only for NCCL groups (gloo and
    the knob off: none, the defaults)."""
    from braid.exchange.nccl import group_options

    assert group_options(None, "nccl") is None
    assert group_options(ExchangeConfig(), "nccl") is None
    assert group_options(ExchangeConfig(high_priority=True), "gloo") is None
    ExchangeConfig(high_priority=True).validate()
