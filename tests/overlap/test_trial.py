"""The chunk trial of `overlap.chunks = "auto"` (braid/overlap/trial.py): which chunk counts it
tries, in what order, and that it keeps the fastest (agreed across ranks), in isolation and
inside `OverlapSession` on a model with the simulated exchange (one process, CPU), with the
layers' timings replaced by known ones. The multi-rank agreement inside training is checked in
tests/overlap/test_train_overlap.py."""

from __future__ import annotations

import pytest
import torch

from braid.config import load_config
from braid.errors import ConfigError
from braid.overlap import timeline
from braid.overlap.session import OverlapSession
from braid.overlap.trial import WARMUP, ChunkTrial, trial_candidates
from braid.parallel.mesh import ParallelContext
from braid.train.model_setup import build_model


def test_candidates_are_c1_the_plan_and_the_best_predicted():
    table = {1: 10.0, 2: 9.0, 3: 8.5, 4: 8.7, 6: 9.5, 8: 11.0}
    assert trial_candidates(table, planned=3) == (1, 2, 3, 4)
    # A plan the table ranks lower (e.g. kept at C=1 by the planner's margin) is tried too.
    assert trial_candidates(table, planned=1) == (1, 2, 3, 4)
    assert trial_candidates({1: 5.0, 2: 5.0, 3: 5.0, 4: 5.0, 6: 5.0}, planned=1) == (1, 2, 3, 4)
    assert trial_candidates({1: 5.0}, planned=1) == (1,)


def test_schedule_warms_up_at_the_plan_then_round_robins_every_layer():
    trial = ChunkTrial({0: (1, 2, 4), 5: (1, 3)}, rounds=2, planned={0: 2, 5: 3})
    assert trial.length == WARMUP + 2 * 3
    steps = [trial.chunks_at(k) for k in range(trial.length)]
    assert steps[:WARMUP] == [{0: 2, 5: 3}] * WARMUP
    assert [s[0] for s in steps[WARMUP:]] == [1, 2, 4, 1, 2, 4]
    assert [s[5] for s in steps[WARMUP:]] == [1, 3, 1, 3, 1, 3]


def _run(trial: ChunkTrial, ms) -> None:
    for k in range(trial.length):
        trial.record(k, {i: ms(i, c, k) for i, c in trial.chunks_at(k).items()})


def test_keeps_the_fastest_step_and_ignores_the_warm_up():
    trial = ChunkTrial({0: (1, 2, 4)}, rounds=3, planned={0: 2})
    fast = {1: 10.0, 2: 9.0, 4: 8.0}
    # C=4 has one slow outlier; the warm-up step (at the plan) is slowest of all.
    _run(trial, lambda i, c, k: 99.0 if k < WARMUP else fast[c] + (5.0 if (c, k) == (4, 3) else 0))
    assert trial.decide(lambda t: t) == {0: 4}
    assert trial.best_ms[(0, 4)] == 8.0 and trial.best_ms[(0, 2)] == 9.0


def test_ties_go_to_the_smaller_chunk_count():
    trial = ChunkTrial({0: (1, 2, 3)}, rounds=1, planned={0: 1})
    _run(trial, lambda i, c, k: 7.0 if c > 1 else 9.0)
    assert trial.decide(lambda t: t) == {0: 2}


def test_the_choice_follows_the_agreed_times_not_the_local_ones():
    trial = ChunkTrial({0: (1, 2, 4), 1: (1, 2)}, rounds=1, planned={0: 1, 1: 1})
    local = {1: 9.0, 2: 5.0, 4: 6.0}
    _run(trial, lambda i, c, k: local[c])
    other_rank = [9.0, 8.0, 6.0, 9.0, 4.0]  # keys: (0,1) (0,2) (0,4) (1,1) (1,2)
    agreed = trial.decide(lambda t: [max(a, b) for a, b in zip(t, other_rank, strict=True)])
    assert agreed == {0: 4, 1: 2}  # alone this rank would keep C=2 for layer 0


def test_trial_steps_must_not_be_negative():
    with pytest.raises(ConfigError, match="overlap.trial_steps"):
        load_config(None, ["--overlap.trial_steps=-1"])


CPU = ParallelContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
MODEL = [
    "--model.dim=32",
    "--model.n_layers=4",
    "--model.n_heads=2",
    "--model.vocab_size=128",
    "--model.ffn_hidden=64",
    "--model.max_seq_len=32",
    "--train.seq_len=16",
    "--train.device=cpu",
    "--moe.layers=[1,3]",
    "--moe.expert_hidden=16",
    "--moe.num_experts=8",
    "--exchange.algorithm=simulated",
    "--exchange.simulate_latency_us=0",
    '--overlap.chunks="auto"',
    "--overlap.max_chunks=4",
]


def _session(overrides: list[str], fake_ms, steps: int | None = None):
    """A session over the model, trained `steps` steps (default: the trial's length) with
    every layer's measured_ms replaced by fake_ms(layer, C)."""
    cfg = load_config(None, MODEL + overrides)
    torch.manual_seed(0)
    model = build_model(cfg, CPU)
    lines: list[str] = []
    kw = dict(device=CPU.device, tokens_per_rank=32, dtype=torch.float32, log=lines.append)
    session = OverlapSession.install(model, cfg.overlap, **kw)
    by_prefix = {lo.timeline.prefix: lo for lo in session.layers.values()}
    real = timeline.LayerTimeline.summary

    def summary(tl):
        out = real(tl)
        lo = by_prefix[tl.prefix]
        return {**out, "measured_ms": fake_ms(lo.layer, lo.chunks)}

    data = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(1))
    n = steps if steps is not None else session._trial.length
    timeline.LayerTimeline.summary = summary
    seen = []
    try:
        for step in range(1, n + 1):
            session.begin_step(step)
            seen.append({i: lo.chunks for i, lo in session.layers.items()})
            out = model(data[:, :-1])
            out.logits.square().mean().backward()
            session.flush()
            session.end_step(step)
    finally:
        timeline.LayerTimeline.summary = real
    return model, session, lines, seen


def test_session_tries_the_candidates_and_keeps_each_layers_fastest():
    fastest = {1: 2, 3: 4}  # MoE layer -> the C its fake timings favour

    def ms(layer, c):
        return 5.0 if c == fastest[layer] else 6.0 + c

    model, session, lines, seen = _session(["--overlap.trial_steps=2"], ms)
    tried = {i: {s[i] for s in seen} for i in (1, 3)}
    assert all({1, fastest[i]} <= tried[i] for i in (1, 3)), tried
    assert {i: lo.chunks for i, lo in session.layers.items()} == fastest
    assert session._trial is None
    trial_lines = [s for s in lines if s.startswith("overlap trial moe")]
    assert len(trial_lines) == 2 and "-> chunks=4" in trial_lines[1], trial_lines
    # After the trial the chunk counts stay put.
    for step in range(3):
        session.begin_step(100 + step)
        assert {i: lo.chunks for i, lo in session.layers.items()} == fastest


def test_a_trial_won_by_the_plain_path_uninstalls_the_engine():
    model, session, lines, _ = _session(["--overlap.trial_steps=1"], lambda i, c: float(c))
    assert session.layers == {}
    assert all(m.overlap is None for m in model.moe_modules().values())


def test_no_trial_without_auto_or_with_trial_steps_0():
    for extra in (["--overlap.trial_steps=0"], ["--overlap.chunks=2"]):
        cfg = load_config(None, MODEL + extra)
        model = build_model(cfg, CPU)
        kw = dict(device=CPU.device, tokens_per_rank=32, dtype=torch.float32, log=lambda s: None)
        assert OverlapSession.install(model, cfg.overlap, **kw)._trial is None
