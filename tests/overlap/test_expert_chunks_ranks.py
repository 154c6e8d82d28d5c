"""Chunks of experts in training on 2 gloo ranks (one spawn): FSDP2 experts (dp=2, ep=1; fp32
and bf16 parameters) and DTensor experts (dp=1, ep=2) give the gradients of overlap off, with
two micro-steps per optimizer step, with and without deferred dW.

The chunks' dW rows of a new grad are written, not added to zeros (`grouped_gemm._add_part`),
so a row no chunk wrote would hold whatever the allocator left there. The workers poison new
unfilled tensors with NaN (`torch.empty_like`), so such a row cannot pass for a zero.
"""

from __future__ import annotations

import torch

from harness import SMALL_SIZES, run_ranks
from train_steps import grad_errors, local_grads, overlap_trainer

TOL = 1e-5
STEPS, MICRO, BATCH = 2, 2, 4
MODEL = [
    *SMALL_SIZES,
    "--model.n_layers=2",
    "--train.warmup=1",
    f"--train.steps={STEPS}",
    "--train.lr=1e-2",
    f"--train.batch_size={BATCH}",
    "--moe.layers=[1]",
    "--moe.num_experts=4",
]
EXPERTS = ["--overlap.chunk_by=experts"]
MODES = {  # name: overrides; each compared with "off" of its layout
    "off": [],
    "c2": EXPERTS + ["--overlap.chunks=2"],
    "c2_split": EXPERTS + ["--overlap.chunks=2", "--overlap.split_dw=experts"],
}
LAYOUTS = {
    "dp2_ep1": ["--parallel.ep=1"],
    "dp2_ep1_bf16": ["--parallel.ep=1", "--parallel.param_dtype=bf16"],
    "dp1_ep2": ["--parallel.ep=2"],
}


def _poison_empty_like():
    real = torch.empty_like

    def empty_like(t, *a, **kw):
        out = real(t, *a, **kw)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out

    torch.empty_like = empty_like
    return real


def _run(cfg, ctx) -> dict:
    from braid.train.loss import loss_fn
    from braid.train.optim import lr_at

    torch.manual_seed(0)
    model, opt, session, amp, b = overlap_trainer(cfg, ctx)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 128, (STEPS, MICRO, BATCH, 17), generator=gen)
    grads: dict = {}
    for step in range(STEPS):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.train)
        session.begin_step(step + 1)
        for m in range(MICRO):
            x = data[step, m, ctx.rank * b : (ctx.rank + 1) * b]
            loss, _ = loss_fn(model, x[:, :-1], x[:, 1:], cfg, amp)
            (loss / MICRO).backward()
        session.flush()
        grads.update({f"{step}/{n}": g for n, g in local_grads(model).items()})
        opt.step()
        opt.zero_grad(set_to_none=True)
        session.end_step(step + 1)
    return grads


def _worker(rank: int, world: int) -> dict:
    from braid.config import load_config
    from braid.parallel.distributed import init_distributed

    real = _poison_empty_like()
    try:
        out = {}
        for layout, extra in LAYOUTS.items():
            for name, ov in MODES.items():
                cfg = load_config(None, MODEL + extra + ov)
                out[f"{layout}/{name}"] = _run(cfg, init_distributed(cfg))
        return out
    finally:
        torch.empty_like = real


def test_chunks_of_experts_train_as_overlap_off_under_fsdp_and_ep():
    per_rank = run_ranks(_worker, 2)
    bad = {}
    for rank, got in enumerate(per_rank):
        for key, grads in got.items():
            layout, _ = key.split("/")
            ref = got[f"{layout}/off"]
            errs = grad_errors(grads, ref)
            wrong = {n: e for n, e in errs.items() if not e <= TOL}  # NaN too
            if wrong:
                bad[f"rank{rank}/{key}"] = wrong
    assert not bad, f"chunks of experts changed the gradients: {bad}"
