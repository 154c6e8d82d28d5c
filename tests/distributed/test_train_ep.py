"""Training under EP x DP (4 gloo ranks) gives the single-process losses; checkpoints reshard.

In the shared spawn (spawn.py), several layouts in turn (each builds its own mesh over the
same process group):
  - (dp=2, ep=2) and (dp=1, ep=4), dense FSDP: 5 steps of a small MoE on the same global
    batches as the single-process run; losses (global-batch CE) and grad norms must match;
  - (dp=2, ep=2) with dense=replicate and activation checkpointing; (dp=4, ep=1), pure data
    parallelism, with activation checkpointing under FSDP; 6 experts under (dp=2, ep=2), 3 per
    rank, so FSDP shards experts on dim 1;
  - the elements each rank holds match `braid info`'s memory estimate for the layout;
  - a checkpoint written by the (2, 2) run after step 3 (Checkpointer, DCP) resumes under
    (1, 4), and in one process (in the parent), and the next steps give the same losses;
  - the attention options (GQA with head_dim, qk-norm, biases, partial rotary, YaRN and
    windows; MLA with a q LoRA and a window) train under EP with the single-process losses.
Each step uses the trainer's own pieces: build_model (meta -> parallelize -> init), loss_fn,
clip_grad_norm, AdamW and the lr schedule. Every rank takes its contiguous slice of each global
batch, as BatchLoader does.
"""

from __future__ import annotations

import pytest
import torch

from harness import SMALL_MODEL

TOL = 1e-5  # on losses
# Grad norms get a looser bound: AdamW's first steps move every weight by about +-lr whatever
# its gradient's size, so a gradient near zero whose last bits differ (another summation order
# over ranks) moves its weight differently, and later gradients inherit that (~1e-5 here).
NORM_TOL = 1e-4
STEPS, SAVE_AT = 5, 3
SMALL = [
    *SMALL_MODEL,
    "--train.batch_size=8",
    "--train.warmup=2",
    f"--train.steps={STEPS}",
    "--train.lr=1e-2",
    "--checkpoint.allow_safe_changes=true",
]
E6 = ["--moe.num_experts=6"]  # a model variant: 3 experts per rank at ep=2
# Every router option and MTP at once: group-limited top-k (4 groups of 2, 2 eligible) on
# sigmoid scores with the balancing bias, routed_scaling, the gated shared expert, and two MTP
# modules whose blocks are MoE (the last layer is), each its own FSDP unit, with an untied head.
ARCH = [
    "--moe.n_groups=4",
    "--moe.topk_groups=2",
    "--moe.score_func=sigmoid",
    "--moe.bias_balance=true",
    "--moe.routed_scaling=2.5",
    "--moe.shared_gate=true",
    "--model.mtp_depth=2",
    "--model.tie_embeddings=false",  # embedding and head are FSDP units; MTP reuses the head
]
# Attention variants (docs/architectures.md): every option on, windows on some layers.
GQA_OPTS = [
    "--model.head_dim=24",
    "--model.qk_norm=head",
    "--model.qkv_bias=true",
    "--model.rope_fraction=0.5",
    "--model.rope_scaling=yarn",
    "--model.rope_factor=2",
    "--model.rope_original_max_seq_len=16",
    "--model.rope_mscale_all_dim=1",
    "--model.window=5",
    "--model.window_every=2",
]
GQA_FULL_NORM = [
    "--model.n_kv_heads=1",
    "--model.qk_norm=full",
    "--model.window=4",
    "--model.window_layers=[0,2]",
]
MLA_OPTS = [
    "--model.attention=mla",
    "--model.q_lora_rank=16",
    "--model.kv_lora_rank=16",
    "--model.qk_rope_head_dim=8",
    "--model.qk_nope_head_dim=8",
    "--model.v_head_dim=12",
    "--model.window=6",
    "--model.window_layers=[1]",
]
LAYOUTS = {  # name: (model variant, layout)
    "dp2_ep2": ([], ["--parallel.ep=2"]),
    "dp1_ep4": ([], ["--parallel.ep=4"]),
    "dp4_ep1_ac": ([], ["--parallel.ep=1", "--parallel.activation_checkpoint=true"]),
    "dp2_ep2_replicate_ac": (
        [],
        ["--parallel.ep=2", "--parallel.dense=replicate", "--parallel.activation_checkpoint=true"],
    ),
    "dp2_ep2_e6_dim1": (E6, ["--parallel.ep=2"]),
    "dp2_ep2_gqa_options": (GQA_OPTS, ["--parallel.ep=2"]),
    "dp1_ep4_gqa_full_norm_ac": (
        GQA_FULL_NORM,
        ["--parallel.ep=4", "--parallel.activation_checkpoint=true"],
    ),
    "dp2_ep2_mla": (MLA_OPTS, ["--parallel.ep=2"]),
    "dp2_ep2_arch": (ARCH, ["--parallel.ep=2"]),
    "dp1_ep4_arch_mla_ac": (
        ARCH + MLA_OPTS,
        ["--parallel.ep=4", "--parallel.activation_checkpoint=true"],
    ),
}

# bf16 compute weights (FSDP2 MixedPrecisionPolicy): same layouts, losses close to fp32's.
MIXED = {
    "dp2_ep2_arch_bf16": (ARCH, ["--parallel.ep=2", "--parallel.param_dtype=bf16"]),
    "dp4_ep1_bf16_replicate": (
        [],
        ["--parallel.ep=1", "--parallel.param_dtype=bf16", "--parallel.dense=replicate"],
    ),
}
MIXED_TOL = 5e-3  # bf16 weights: 8 bits of mantissa; measured ~3e-4 over these 5 steps


class Cursor:
    """The loader part a checkpoint needs: which global batch comes next."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


def _batches() -> torch.Tensor:
    return torch.randint(0, 128, (STEPS, 8, 17), generator=torch.Generator().manual_seed(0))


def _run(cfg, ctx, run_dir: str | None, start_from: str | None, save_at: int | None) -> dict:
    """(loss, grad norm) of the steps from the start (or a checkpoint) up to STEPS, and the
    number of parameter elements this rank holds."""
    from braid.checkpoint.manager import Checkpointer
    from braid.parallel.clip import clip_grad_norm
    from braid.parallel.distributed import all_reduce_mean
    from braid.train.model_setup import build_model
    from braid.train.optim import build_optimizer, lr_at
    from braid.train.trainer import TrainState, autocast, loss_fn

    model = build_model(cfg, ctx)
    held = sum(getattr(p, "_local_tensor", p).numel() for p in model.parameters())
    opt = build_optimizer(model, cfg.train, ctx.device)
    cursor, state = Cursor(), TrainState()
    if start_from is not None:
        cfg = cfg.replace(checkpoint={"resume": start_from})
        Checkpointer(run_dir, cfg, ctx).resume(model, opt, cursor, state)
    data, amp, b = _batches(), autocast(cfg, ctx.device), cfg.train.batch_size // ctx.world
    steps = []
    while state.step < STEPS:
        for g in opt.param_groups:
            g["lr"] = lr_at(state.step, cfg.train)
        x = data[cursor.step][ctx.rank * b : (ctx.rank + 1) * b]
        loss, parts = loss_fn(model, x[:, :-1], x[:, 1:], cfg, amp)
        loss.backward()
        norm = clip_grad_norm(model, cfg.train.grad_clip, ctx)
        mtp = parts.get("mtp", torch.zeros(()))  # the MTP loss (ARCH), else 0
        ce, mtp = all_reduce_mean(torch.stack([parts["ce"], mtp]), ctx).tolist()
        steps.append((ce, float(norm), mtp))
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_biases()
        state.step, cursor.step = state.step + 1, cursor.step + 1
        if state.step == save_at:
            Checkpointer(run_dir, cfg, ctx).save(model, opt, cursor, state)
    return {"steps": steps, "held": held}


def rank_checks(rank: int, world: int, run_dir: str) -> dict:
    from braid.config import load_config
    from braid.parallel.distributed import init_distributed

    results = {}
    for name, (model, layout) in MIXED.items():
        cfg = load_config(None, SMALL + model + layout)
        results[name] = _run(cfg, init_distributed(cfg), run_dir, None, None)
    for name, (model, layout) in LAYOUTS.items():
        cfg = load_config(None, SMALL + model + layout)
        save = SAVE_AT if name == "dp2_ep2" else None
        results[name] = _run(cfg, init_distributed(cfg), run_dir, None, save)
    cfg = load_config(None, SMALL + ["--parallel.ep=4"])
    ckpt = f"{run_dir}/checkpoints/step_{SAVE_AT:08d}"
    results["resumed_dp1_ep4"] = _run(cfg, init_distributed(cfg), run_dir, ckpt, None)
    return results


def _single(model: list[str], run_dir: str | None = None, start: str | None = None) -> list:
    from braid.config import load_config
    from braid.parallel.mesh import ParallelContext

    ctx = ParallelContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    return _run(load_config(None, SMALL + model), ctx, run_dir, start, None)["steps"]


def _max_rel(got: list, ref: list) -> tuple[float, float]:
    assert len(got) == len(ref)
    loss = max(
        abs(g[i] - r[i]) / max(abs(r[i]), 1e-30)
        for g, r in zip(got, ref, strict=True)
        for i in (0, 2)
        if r[i] or g[i]
    )
    norm = max(abs(g[1] - r[1]) / abs(r[1]) for g, r in zip(got, ref, strict=True))
    return loss, norm


def test_ep_layouts_match_single_process_and_checkpoint_reshards(four_ranks):
    results, run_dir = four_ranks
    per_rank = [r["train"] for r in results]
    for r in per_rank[1:]:  # every rank reports the same global numbers
        assert {k: v["steps"] for k, v in r.items()} == {
            k: v["steps"] for k, v in per_rank[0].items()
        }
    refs = {tuple(model): _single(model) for model, _ in LAYOUTS.values()}
    got = {
        name: (per_rank[0][name]["steps"], refs[tuple(model)])
        for name, (model, _) in LAYOUTS.items()
    }
    ckpt = f"{run_dir}/checkpoints/step_{SAVE_AT:08d}"
    got["resumed_dp1_ep4"] = (per_rank[0]["resumed_dp1_ep4"]["steps"], refs[()])
    got["resumed_single_process"] = (_single([], run_dir, ckpt), refs[()])
    bad = []
    for name, (steps, ref) in got.items():
        want = ref[-len(steps) :]  # resumed runs cover the last steps only
        loss_err, norm_err = _max_rel(steps, want)
        print(
            f"{name:>24}: {len(steps)} steps, max rel err loss {loss_err:.2e}, "
            f"grad norm {norm_err:.2e}"
        )
        if loss_err > TOL or norm_err > NORM_TOL:
            bad.append(name)
    assert not bad, f"losses/grad norms differ from the single-process run: {bad}"


def test_bf16_compute_weights_train_close_to_the_fp32_run(four_ranks):
    results, _ = four_ranks
    for name, (model, _) in MIXED.items():
        steps = results[0]["train"][name]["steps"]
        ref = _single(model)
        loss_err = max(abs(g[0] - r[0]) / r[0] for g, r in zip(steps, ref, strict=True))
        print(f"{name:>24}: max rel err loss vs fp32 {loss_err:.2e}")
        assert loss_err < MIXED_TOL, name
        assert loss_err > 1e-6, f"{name}: bf16 weights would not give fp32's losses to 1e-6"


def test_bf16_param_dtype_needs_torchrun():
    from braid.config import load_config
    from braid.errors import BraidError
    from braid.parallel.mesh import ParallelContext
    from braid.train.model_setup import build_model

    cfg = load_config(None, SMALL + ["--parallel.param_dtype=bf16"])
    ctx = ParallelContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(BraidError, match="parallel.param_dtype=bf16"):
        build_model(cfg, ctx)


def test_info_memory_matches_what_ranks_hold(four_ranks):
    from braid.config import load_config
    from braid.info import memory_per_gpu

    results, _ = four_ranks
    for name, (model, layout) in {**LAYOUTS, **MIXED}.items():
        cfg = load_config(None, SMALL + model + layout)
        want = memory_per_gpu(cfg, 4, cfg.parallel.ep, cfg.parallel.dense).states / 16
        assert max(r["train"][name]["held"] for r in results) == want, name
