"""End to end: training steps under EP x DP (4 gloo ranks) give the same losses, grad norms and
first-step gradients of every parameter with the overlap engine on as off, for (dp=2, ep=2) and
(dp=1, ep=4), chunks 1-4 with split_dw on and off.

Built from the trainer's own pieces (build_model -> parallelize -> init, OverlapSession.install,
loss_fn, flush, clip_grad_norm, AdamW), as tests/distributed/test_train_ep.py does. With dp=1
the routed experts are no FSDP unit, so split_dw defers their dW into the exchange windows too
(asserted); with dp=2 they are an FSDP unit and only the shared expert's dW is deferred.
"""

from __future__ import annotations

import numpy as np
import torch

from harness import SMALL_MODEL, run_ranks

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
    "auto_split_report": [
        '--overlap.chunks="auto"',
        "--overlap.split_dw=true",
        "--overlap.report=true",
        "--overlap.max_chunks=4",
    ],
}


def _run(cfg, ctx) -> tuple[list, dict, dict, list]:
    from braid.overlap.session import OverlapSession
    from braid.parallel.clip import clip_grad_norm
    from braid.parallel.distributed import all_reduce_mean
    from braid.train.model_setup import build_model
    from braid.train.optim import build_optimizer, lr_at
    from braid.train.trainer import autocast, loss_fn

    model = build_model(cfg, ctx)
    opt = build_optimizer(model, cfg.train, ctx.device)
    b, amp = cfg.train.batch_size // ctx.world, autocast(cfg, ctx.device)
    overlap = OverlapSession.install(
        model,
        cfg.overlap,
        device=ctx.device,
        dtype=torch.float32,
        tokens_per_rank=b * cfg.train.seq_len,
        is_main=False,
    )
    data = torch.randint(0, 128, (STEPS, 8, 17), generator=torch.Generator().manual_seed(0))
    out, metrics, grads = [], {}, {}
    for step in range(STEPS):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.train)
        overlap.begin_step(step + 1)
        x = data[step][ctx.rank * b : (ctx.rank + 1) * b]
        loss, parts = loss_fn(model, x[:, :-1], x[:, 1:], cfg, amp)
        loss.backward()
        overlap.flush()
        if step == 0:  # this rank's block of every gradient, before clipping
            for n, p in model.named_parameters():
                g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                grads[n] = g.detach().numpy().copy()  # by value through the queue
        norm = clip_grad_norm(model, cfg.train.grad_clip, ctx)
        out.append((float(all_reduce_mean(parts["ce"], ctx)), float(norm)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_biases()
        metrics = overlap.end_step(step + 1) or metrics
    deferred = [lo.defer_expert_dw for lo in overlap.layers.values()]
    return out, metrics, grads, deferred


def _worker(rank: int, world: int) -> dict:
    from braid.config import load_config
    from braid.parallel.distributed import init_distributed

    results = {}
    for layout, extra in LAYOUTS.items():
        for name, ov in OVERLAP.items():
            cfg = load_config(None, SMALL + extra + ov)
            results[f"{layout}/{name}"] = _run(cfg, init_distributed(cfg))
    return results


def test_training_with_overlap_matches_overlap_off_under_ep():
    per_rank = run_ranks(_worker, 4)
    bad = {}
    for rank, got in enumerate(per_rank):
        for key, (_, _, grads, _) in got.items():
            ref = got[f"{key.split('/')[0]}/off"][2]
            assert grads.keys() == ref.keys()
            for n, g in grads.items():
                err = float(np.linalg.norm(g - ref[n]) / max(np.linalg.norm(ref[n]), 1e-30))
                if err > TOL:
                    bad[f"rank{rank}/{key}/{n}"] = err
    got = per_rank[0]
    for key, (steps, metrics, _, deferred) in got.items():
        layout, name = key.split("/")
        if "split" in name:  # routed-expert dW deferred exactly where no FSDP unit forbids it
            assert deferred and all(d == (layout == "dp1_ep4") for d in deferred), (key, deferred)
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
