"""`overlap.split_dw = "all"` on 2 gloo ranks (one spawn): expert parallelism (dp=1, ep=2) and
FSDP2 data parallelism (dp=2, ep=1; experts an FSDP unit too) give the gradients, losses and
grad norms of overlap off, with two micro-steps per optimizer step, also with chunks=2 and
report, FSDP2's bf16 parameters, `parallel.dense=replicate`, and an untied head deferred into
the top MoE layer: an FSDP unit of its own (also called again by an MTP module), or inside the
root unit (replicate).

Every block is an FSDP unit over the world here, and a deferred attention / dense-FFN dW runs in
the windows of an MoE layer below its block, after the gradient has left the block: the engine
holds the block's unit (`overlap/fsdp_unit.py`, `HeldUnit`) and reduces it at that MoE layer's
flush point. Checked: each block unit is reduce-scattered exactly once per backward in every
mode; and the controls `all_nohold` and `all_untied_nohold` (the same runs with the holding of
the blocks and the head switched off) lose the deferred blocks' (and the head's) gradients, so
the comparison can fail where the ordering is wrong.

Model as tests/overlap/test_split_all.py: 6 blocks, MoE layers 1, 3, 4, a shared expert.
"""

from __future__ import annotations

import torch

from harness import SMALL_SIZES, run_ranks
from train_steps import grad_errors, local_grads, overlap_trainer

TOL = 1e-5
STEPS, MICRO, BATCH = 2, 2, 4
MODEL = [
    *SMALL_SIZES,
    "--model.n_layers=6",
    "--train.warmup=1",
    f"--train.steps={STEPS}",
    "--train.lr=1e-2",
    f"--train.batch_size={BATCH}",
    "--moe.layers=[1,3,4]",
    "--moe.num_experts=4",
    "--moe.num_shared_experts=1",
]
ALL = ["--overlap.split_dw=all"]
BF16 = ["--parallel.param_dtype=bf16"]
REPL = ["--parallel.dense=replicate"]
UNTIED = ["--model.tie_embeddings=false"]
MTP = ["--model.mtp_depth=1"]
# name: (overrides, the mode it is compared with)
MODES = {
    "off": ([], "off"),
    "experts": (["--overlap.split_dw=experts"], "off"),
    "all": (ALL, "off"),
    "all_c2_report": (ALL + ["--overlap.chunks=2", "--overlap.report=true"], "off"),
    "all_nohold": (ALL, "off"),  # the control: must differ
}
FSDP_ONLY = {  # dp=2 only: the dense units' dtype and kind
    "off_bf16": (BF16, "off_bf16"),
    "all_bf16": (ALL + BF16, "off_bf16"),
    "off_repl": (REPL, "off_repl"),
    "all_repl": (ALL + REPL, "off_repl"),
    "off_untied": (UNTIED, "off_untied"),  # the head an FSDP unit of its own, deferred
    "all_untied": (ALL + UNTIED, "off_untied"),
    "all_untied_nohold": (ALL + UNTIED, "off_untied"),  # the control: must differ
    "off_untied_mtp": (UNTIED + MTP, "off_untied_mtp"),  # the head called twice per step
    "all_untied_mtp": (ALL + UNTIED + MTP, "off_untied_mtp"),
    "off_untied_repl": (UNTIED + REPL, "off_untied_repl"),  # the head inside the root unit
    "all_untied_repl": (ALL + UNTIED + REPL, "off_untied_repl"),
}
LAYOUTS = {"dp1_ep2": ["--parallel.ep=2"], "dp2_ep1": ["--parallel.ep=1"]}
DEFERRED_BLOCKS = (2, 3, 4, 5)


class _BlockReductions:
    """Counts the real reduce-scatters of the blocks' FSDP units, and of the head's unit apart
    (FSDP2's param groups)."""

    def __init__(self):
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

        self.cls, self.count, self.head = FSDPParamGroup, 0, 0
        self.post_backward = FSDPParamGroup.post_backward

    def __enter__(self):
        from braid.model.transformer import Block

        def post_backward(group, *a):
            if group.reduce_grads and group.is_unsharded:
                self.count += any(isinstance(m, Block) for m in group.modules)
                self.head += any(isinstance(m, torch.nn.Linear) for m in group.modules)
            return self.post_backward(group, *a)

        self.cls.post_backward = post_backward
        return self

    def __exit__(self, *exc):
        self.cls.post_backward = self.post_backward


def _run(cfg, ctx, hold: bool) -> dict:
    from braid.model.transformer import Block
    from braid.overlap.fsdp_unit import HeldUnit
    from braid.parallel.clip import clip_grad_norm
    from braid.parallel.distributed import all_reduce_mean
    from braid.train.loss import loss_fn
    from braid.train.optim import lr_at

    torch.manual_seed(0)
    model, opt, session, amp, b = overlap_trainer(cfg, ctx)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 128, (STEPS, MICRO, BATCH, 17), generator=gen)
    steps, grads, reductions, metrics = [], {}, [], {}
    real_hold = HeldUnit.hold
    if not hold:  # blocks and the head; the expert units (dp=2) are held as always

        def hold_experts_only(unit):
            if not isinstance(unit.module, (Block, torch.nn.Linear)):
                real_hold(unit)

        HeldUnit.hold = hold_experts_only
    try:
        for step in range(STEPS):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg.train)
            session.begin_step(step + 1)
            ces = []
            with _BlockReductions() as red:
                for m in range(MICRO):
                    x = data[step, m, ctx.rank * b : (ctx.rank + 1) * b]
                    loss, parts = loss_fn(model, x[:, :-1], x[:, 1:], cfg, amp)
                    (loss / MICRO).backward()
                    ces.append(parts["ce"])
                leftover = session.flush()
            reductions.append((red.count, leftover, red.head))
            if step == 0:  # this rank's block of every gradient, before clipping
                grads = local_grads(model)
            norm = clip_grad_norm(model, cfg.train.grad_clip, ctx)
            ce = all_reduce_mean(torch.stack(ces).mean(), ctx)
            steps.append((float(ce), float(norm)))
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.update_router_biases()
            metrics = session.end_step(step + 1) or metrics
    finally:
        HeldUnit.hold = real_hold
    drained = {i: lo.dense.num_run for i, lo in session.layers.items()}
    return {
        "steps": steps,
        "grads": grads,
        "reductions": reductions,
        "metrics": metrics,
        "dense_tasks": drained,
    }


def _worker(rank: int, world: int) -> dict:
    from braid.config import load_config
    from braid.parallel.distributed import init_distributed

    out = {}
    for layout, extra in LAYOUTS.items():
        modes = {**MODES, **(FSDP_ONLY if layout == "dp2_ep1" else {})}
        for name, (ov, _) in modes.items():
            cfg = load_config(None, MODEL + extra + ov)
            out[f"{layout}/{name}"] = _run(cfg, init_distributed(cfg), hold="nohold" not in name)
    return out


def test_split_all_matches_overlap_off_under_ep_and_fsdp():
    per_rank = run_ranks(_worker, 2)
    bad = {}
    for rank, got in enumerate(per_rank):
        for key, res in got.items():
            layout, name = key.split("/")
            ref_name = {**MODES, **FSDP_ONLY}[name][1]
            ref = got[f"{layout}/{ref_name}"]
            errs = grad_errors(res["grads"], ref["grads"])
            step_err = max(
                abs(a - r) / abs(r)
                for s, q in zip(res["steps"], ref["steps"], strict=True)
                for a, r in zip(s, q, strict=True)
            )
            if "nohold" in name:  # the control: the deferred blocks (and head) lose their grads
                lost = {n for n, e in errs.items() if e > TOL}
                blocks = {int(n.split(".")[1]) for n in lost if n.startswith("blocks.")}
                assert blocks == set(DEFERRED_BLOCKS), (key, sorted(lost))
                assert ("output.weight" in lost) == ("untied" in name), (key, sorted(lost))
                continue
            worst = max(errs.values())
            print(f"rank{rank} {key:>24}: grads {worst:.1e}, (loss, grad norm) {step_err:.1e}")
            if worst > TOL or step_err > TOL:
                bad[f"rank{rank}/{key}"] = (worst, step_err, max(errs, key=errs.get))
            if "repl" not in name:  # each block unit reduce-scattered once per backward
                red = res["reductions"]  # (blocks, leftover, head); the MTP unit is no Block
                assert all(r[:2] == (6 * MICRO, 0) for r in red), (key, red)
            if name.startswith("all_untied") and "repl" not in name:  # the head's unit: once
                assert all(r[2] == MICRO for r in res["reductions"]), (key, res["reductions"])
            if name.startswith("all"):  # blocks 2-5: 16 deferred linears (+ an untied head,
                linears = 16 + ("untied" in name) + ("mtp" in name)  # called again by MTP)
                assert sum(res["dense_tasks"].values()) == linears * MICRO * STEPS, key
    assert not bad, f"split_dw=all changed the training numerics: {bad}"
    metrics = per_rank[0]["dp2_ep1/all_c2_report"]["metrics"]
    assert any(k.startswith("overlap/dense_dW_ms/layer") for k in metrics), metrics
