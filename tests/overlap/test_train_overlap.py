"""End to end: training steps under EP x DP (4 gloo ranks) give the same losses, grad norms and
first-step gradients of every parameter with the overlap engine on as off, for (dp=2, ep=2) and
(dp=1, ep=4), chunks 1-4 with split_dw on and off (chunks="auto": the chunk trial changes C
between steps), and chunks of tokens with their routed dW joined (deferred or not) or per
chunk. In the same spawn, the chunk trial under ep=4 keeps the same C on every rank.

Built from the trainer's own pieces (build_model -> parallelize -> init, OverlapSession.install,
loss_fn, flush, clip_grad_norm, AdamW), as tests/distributed/test_train_ep.py does. With dp=1
the routed experts are no FSDP unit; with dp=2 they are one, which the engine gathers once per
layer and reduce-scatters once per layer, at the flush point after the deferred dW
(`overlap/fsdp_unit.py`). In both layouts split_dw defers the routed experts' dW (asserted), and
with dp=2 the expert unit's all-gathers and reduce-scatters are counted: one of each per MoE
layer and direction, whatever C.
"""

from __future__ import annotations

import numpy as np
import torch

from harness import SMALL_MODEL, run_ranks
from train_steps import local_grads, overlap_trainer

TOL = 1e-5
STEPS = 3
SMALL = [
    *SMALL_MODEL,
    "--train.batch_size=8",
    "--train.warmup=2",
    f"--train.steps={STEPS}",
    "--train.lr=1e-2",
]
LAYOUTS = {"dp2_ep2": ["--parallel.ep=2"], "dp1_ep4": ["--parallel.ep=4"]}
OVERLAP = {
    "off": [],
    "split_dw": ["--overlap.split_dw=true"],
    "chunks3": ["--overlap.chunks=3"],
    "chunks2_split": ["--overlap.chunks=2", "--overlap.split_dw=true"],
    "chunks4_split": ["--overlap.chunks=4", "--overlap.split_dw=true"],
    # chunks of tokens (also where a rank holds 4 experts, so under FSDP with dp=2), their
    # routed dW joined over the chunks or added per chunk (`overlap.chunk_dw`)
    "tokens3_split_joined": [
        "--overlap.chunks=3",
        "--overlap.split_dw=true",
        "--overlap.chunk_by=tokens",
        "--overlap.chunk_dw=joined",
    ],
    "tokens3_split_per_chunk": [
        "--overlap.chunks=3",
        "--overlap.split_dw=true",
        "--overlap.chunk_by=tokens",
        "--overlap.chunk_dw=per_chunk",
    ],
    "tokens3_joined": [  # not deferred: joined at the last chunk's backward
        "--overlap.chunks=3",
        "--overlap.chunk_by=tokens",
        "--overlap.chunk_dw=joined",
    ],
    "auto_split_report": [
        '--overlap.chunks="auto"',
        "--overlap.split_dw=true",
        "--overlap.report=true",
        "--overlap.max_chunks=4",
    ],
}


class _ExpertComms:
    """Counts the expert units' real all-gathers and reduce-scatters (FSDP2's param groups)."""

    def __init__(self):
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

        self.cls, self.gathers, self.reduces = FSDPParamGroup, 0, 0
        self.unshard, self.post_backward = FSDPParamGroup.unshard, FSDPParamGroup.post_backward

    def __enter__(self):
        from braid.moe.experts import GroupedExperts

        def experts(group) -> bool:
            return any(isinstance(m, GroupedExperts) for m in group.modules)

        def unshard(group, *a, **k):
            if experts(group) and not group.is_unsharded and group._all_gather_result is None:
                self.gathers += 1
            return self.unshard(group, *a, **k)

        def post_backward(group, *a):
            if experts(group) and group.reduce_grads and group.is_unsharded:
                self.reduces += 1
            return self.post_backward(group, *a)

        self.cls.unshard, self.cls.post_backward = unshard, post_backward
        return self

    def __exit__(self, *exc):
        self.cls.unshard, self.cls.post_backward = self.unshard, self.post_backward


def _run(cfg, ctx) -> tuple[list, dict, dict, list]:
    from braid.parallel.clip import clip_grad_norm
    from braid.parallel.distributed import all_reduce_mean
    from braid.train.loss import loss_fn
    from braid.train.optim import lr_at

    model, opt, overlap, amp, b = overlap_trainer(cfg, ctx)
    data = torch.randint(0, 128, (STEPS, 8, 17), generator=torch.Generator().manual_seed(0))
    out, metrics, grads = [], {}, {}
    for step in range(STEPS):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.train)
        overlap.begin_step(step + 1)
        x = data[step][ctx.rank * b : (ctx.rank + 1) * b]
        with _ExpertComms() as comms:
            loss, parts = loss_fn(model, x[:, :-1], x[:, 1:], cfg, amp)
            loss.backward()
            overlap.flush()
        if step == 0:
            counts = (comms.gathers, comms.reduces, len(model.moe_modules()))
        if step == 0:  # this rank's block of every gradient, before clipping
            grads = local_grads(model)
        norm = clip_grad_norm(model, cfg.train.grad_clip, ctx)
        out.append((float(all_reduce_mean(parts["ce"], ctx)), float(norm)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_biases()
        metrics = overlap.end_step(step + 1) or metrics
    deferred = [lo.defer_expert_dw for lo in overlap.layers.values()]
    return out, metrics, grads, deferred, counts


def _fake_ms(rank: int, layer: int, chunks: int) -> float:
    """Per-rank stand-in timings of the chunk trial: the ranks disagree on the fastest C."""
    return 10.0 + (chunks * (rank + 1) * 7 + layer) % 5


def _trial(cfg, ctx) -> tuple[dict, dict, dict]:
    """`chunks="auto"` with a one-round trial over fake per-rank timings: (the candidates, what
    each layer keeps, what this rank alone would keep)."""
    from braid.overlap import timeline
    from braid.train.loss import loss_fn

    model, opt, overlap, amp, b = overlap_trainer(cfg, ctx)
    layers = dict(overlap.layers)
    by_prefix = {lo.timeline.prefix: lo for lo in layers.values()}
    real = timeline.LayerTimeline.summary

    def summary(tl):
        lo = by_prefix[tl.prefix]
        return {**real(tl), "measured_ms": _fake_ms(ctx.rank, lo.layer, lo.chunks)}

    trial = overlap._trial
    data = torch.randint(0, 128, (trial.length, 8, 17), generator=torch.Generator().manual_seed(0))
    timeline.LayerTimeline.summary = summary
    try:
        for step in range(trial.length):
            overlap.begin_step(step + 1)
            x = data[step][ctx.rank * b : (ctx.rank + 1) * b]
            loss, _ = loss_fn(model, x[:, :-1], x[:, 1:], cfg, amp)
            loss.backward()
            overlap.flush()
            opt.zero_grad(set_to_none=True)
            overlap.end_step(step + 1)
    finally:
        timeline.LayerTimeline.summary = real
    alone = {
        i: min(cs, key=lambda c, i=i: (_fake_ms(ctx.rank, i, c), c))
        for i, cs in trial.candidates.items()
    }
    return trial.candidates, {i: lo.chunks for i, lo in layers.items()}, alone


def _worker(rank: int, world: int) -> dict:
    from braid.config import load_config
    from braid.parallel.distributed import init_distributed

    results = {}
    for layout, extra in LAYOUTS.items():
        for name, ov in OVERLAP.items():
            cfg = load_config(None, SMALL + extra + ov)
            results[f"{layout}/{name}"] = _run(cfg, init_distributed(cfg))
    trial = ['--overlap.chunks="auto"', "--overlap.trial_steps=1", "--overlap.max_chunks=4"]
    cfg = load_config(None, SMALL + LAYOUTS["dp1_ep4"] + trial)
    return results, _trial(cfg, init_distributed(cfg))


def test_training_with_overlap_matches_overlap_off_under_ep():
    out = run_ranks(_worker, 4)
    per_rank, trials = [r for r, _ in out], [t for _, t in out]
    # The chunk trial: every rank keeps the C of the lowest MAX over the ranks' timings, though
    # alone the ranks would keep different ones.
    cands = trials[0][0]
    assert all(t[0] == cands for t in trials)
    want = {
        i: min(cs, key=lambda c, i=i: (max(_fake_ms(r, i, c) for r in range(4)), c))
        for i, cs in cands.items()
    }
    assert all(t[1] == want for t in trials), (want, [t[1] for t in trials])
    assert len({tuple(sorted(t[2].items())) for t in trials}) > 1, "the ranks never disagreed"
    bad = {}
    for rank, got in enumerate(per_rank):
        for key, (_, _, grads, _, _) in got.items():
            ref = got[f"{key.split('/')[0]}/off"][2]
            assert grads.keys() == ref.keys()
            for n, g in grads.items():
                err = float(np.linalg.norm(g - ref[n]) / max(np.linalg.norm(ref[n]), 1e-30))
                if err > TOL:
                    bad[f"rank{rank}/{key}/{n}"] = err
    got = per_rank[0]
    for key, (steps, metrics, _, deferred, (gathers, reduces, moes)) in got.items():
        layout, name = key.split("/")
        if "split" in name:  # routed-expert dW deferred in both layouts
            assert deferred and all(deferred), (key, deferred)
        if layout == "dp2_ep2":  # the expert unit: gathered once per direction, reduced once
            assert (gathers, reduces) == (2 * moes, moes), (key, gathers, reduces, moes)
        ref = got[f"{layout}/off"][0]
        err = max(
            abs(a - r) / abs(r)
            for s, q in zip(steps, ref, strict=True)
            for a, r in zip(s, q, strict=True)
        )
        print(f"{key:>28}: max rel err (loss, grad norm) {err:.2e}")
        if err > TOL:
            bad[key] = err
        if key.endswith("report"):  # timed at every step (log_every=1): metrics for each layer
            assert any(k.startswith("overlap/exposed_ms/layer") for k in metrics), metrics
            assert any(k.startswith("overlap/predicted_ms/layer") for k in metrics), metrics
    assert not bad, f"overlap changed the training numerics beyond {TOL}: {bad}"
