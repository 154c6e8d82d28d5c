"""Forward + backward of a whole Braid model on one GPU: step time, tokens/s and MFU.

    PYTHONPATH=src python benchmarks/model_step.py --config medium --out results/x.json
    PYTHONPATH=src python benchmarks/model_step.py --config moonlight --set model.n_layers=8 \
        --batch 2 --seq 4096 --variants eager,compile \
        --out benchmarks/results/model_step_moonlight_h100.json
(moonlight's 27 layers hold 16B fp32 weights + grads, 128 GB, more than one GPU; 8 layers of
the same shape, 4.9B, fit an 80 GB H100 with the fp32 logits of 8192 tokens.)

`--set section.key=value` (repeatable) overrides the config, e.g. fewer layers of the same shape
when a preset does not fit one GPU. MFU counts training FLOPs per token from `braid.info`
(6 x active GEMM parameters + causal attention, with MLA's query-key and value widths and the
MTP modules) against the H100/H200 dense bf16 datasheet peak (989 TFLOP/s) and, for reference,
against the 788 TFLOP/s a large bf16 matmul reaches on the same machine. Weights are fp32 with
bf16 autocast, as in training. The optimizer step is excluded (forward + backward only).
Variants `cast` (compiled) and `eager_cast` set `train.cast_weights_once`: each step is a
micro-step on the bf16 weight copies (`braid.train.weight_cast`), its bf16 grads moved into
fp32 ones as in training; the cast that an optimizer step pays once, whatever its micro-steps,
is timed apart (`cast_refresh_ms`). `--variants compile,cast` compares the two in one run.
`--no-wgrad-kernel` switches off the Triton kernel that writes the routed experts' fp32 dW
(`braid.ops.wgrad_triton`; grouped_mm + the cast instead), for an A/B of two runs. Variant
`cast_swap` is `cast` with the routed experts' weights swapped like the linears' (their bf16
dW moved into the fp32 grads), as with `train.grad_accum > 1`, instead of handed to the module
as copies, as with one micro-step per optimizer step (`cast`: every timed step here is one
micro-step whose grads start from none). Variant `cast_bf16res` is `cast` with
`model.residual = "compute"` (a bf16 residual stream).
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from common import environment, time_cuda, write_result  # noqa: E402

from braid.config import load_config  # noqa: E402
from braid.info import arithmetic  # noqa: E402
from braid.parallel.mesh import ParallelContext  # noqa: E402
from braid.train.loss import autocast, compute_dtype, loss_fn  # noqa: E402
from braid.train.model_setup import build_model  # noqa: E402
from braid.train.weight_cast import StepCast, check_cast  # noqa: E402

PEAK = 989e12
# name: (train.compile, activation checkpointing, train.cast_weights_once, more overrides)
VARIANTS = {
    "eager": (False, False, False, ()),
    "compile": (True, False, False, ()),
    "ac": (False, True, False, ()),
    "cast": (True, False, True, ()),
    "cast_swap": (True, False, "swap", ()),
    "eager_cast": (False, False, True, ()),
    "cast_bf16res": (True, False, True, ("model.residual=compute",)),
}


def matmul_ceiling() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = time_cuda(lambda: a @ b, iters=10)
    return 2 * 8192**3 / (t["median_ms"] / 1e3)


def make_step(
    config: str,
    batch: int,
    seq: int,
    compile_: bool,
    ac: bool,
    sets: tuple[str, ...] = (),
    swap_experts: bool = False,
):
    """(step, cfg): one forward + backward of `config` on random tokens (grads dropped after);
    `swap_experts`: `StepCast(feed_experts=False)` (variant cast_swap)."""
    cfg = load_config(
        config,
        [
            f"--train.seq_len={seq}",
            f"--train.compile={str(compile_).lower()}",
            f"--parallel.activation_checkpoint={str(ac).lower()}",
            "--parallel.ep=1",
            *(f"--{s}" for s in sets),
        ],
    )
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # max_mem_gib is this run's peak: free the previous run's model first (compiled graphs hold
    # references to their modules until dynamo is reset and the cycles collected).
    gc.collect()
    torch._dynamo.reset()
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    ctx = ParallelContext(rank=0, world=1, local_rank=0, device=dev)
    model = build_model(cfg, ctx)
    amp = autocast(cfg, dev)
    x = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1), device=dev)
    cast, swap = None, None
    if cfg.train.cast_weights_once:  # the micro-steps of a step, on bf16 copies cast once
        check_cast(True, compute_dtype(cfg, dev), 1)
        cast = StepCast(model, feed_experts=not swap_experts)
        swap = cast.swapped()  # held while the step lives: every step is a micro-step
        swap.__enter__()

    def step():
        loss, _ = loss_fn(model, x[:, :-1], x[:, 1:], cfg, amp)
        loss.backward()
        if cast is not None:
            cast.collect()  # the bf16 grads into fp32 ones, as the trainer's micro-steps
            cast.drop_grads()
        for p in model.parameters():
            p.grad = None

    # The step keeps the swap open: a context manager dropped here would close it, restoring
    # the fp32 weights.
    step.cast, step.swap = cast, swap  # type: ignore[attr-defined]
    return step, cfg


def run(
    config: str,
    batch: int,
    seq: int,
    compile_: bool,
    ac: bool,
    iters: int,
    sets: tuple[str, ...] = (),
    swap_experts: bool = False,
) -> dict:
    step, cfg = make_step(config, batch, seq, compile_, ac, sets, swap_experts)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t = time_cuda(step, iters=iters, warmup=3 if not compile_ else 4)
    a = arithmetic(cfg, seq)
    tokens_per_s = batch * seq / (t["median_ms"] / 1e3)
    out = {
        "config": config,
        "overrides": list(sets),
        "batch": batch,
        "seq_len": seq,
        "compile": compile_,
        "activation_checkpoint": ac,
        **t,
        "tokens_per_s": round(tokens_per_s),
        "total_params": a.total_params,
        "active_params": a.active_params,
        "flops_per_token": a.flops_per_token,
        "tflops": round(tokens_per_s * a.flops_per_token / 1e12, 1),
        "mfu_vs_989": round(tokens_per_s * a.flops_per_token / PEAK, 4),
    }
    if dev.type == "cuda":
        out["max_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    if step.cast is not None:  # the once-per-optimizer-step cast, not in median_ms
        out["cast_refresh_ms"] = round(time_cuda(step.cast.refresh, iters=5)["median_ms"], 3)
    step = None  # frees the model (the closure holds it)
    torch.cuda.empty_cache() if dev.type == "cuda" else None
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="medium")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument(
        "--variants",
        default="eager,compile",
        help="comma list of: " + ", ".join(VARIANTS) + " (cast: train.cast_weights_once)",
    )
    p.add_argument("--out", default="benchmarks/results/model_step.json")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="config override (repeatable), e.g. model.n_layers=8",
    )
    p.add_argument(
        "--no-wgrad-kernel",
        action="store_true",
        help="the routed experts' fp32 dW from grouped_mm + the cast, not the Triton kernel",
    )
    args = p.parse_args()
    if args.no_wgrad_kernel:
        from braid.ops import wgrad_triton

        wgrad_triton.usable = lambda *a: False  # read at call time by braid.ops.grouped_gemm
    variants = args.variants.split(",")
    if unknown := [v for v in variants if v not in VARIANTS]:
        raise SystemExit(f"--variants: unknown {unknown}; expected of {list(VARIANTS)}")
    result = {"env": environment(), "runs": [], "wgrad_kernel": not args.no_wgrad_kernel}
    if torch.cuda.is_available():
        result["matmul_bf16_tflops"] = round(matmul_ceiling() / 1e12, 1)
    for v in variants:
        compile_, ac, cast, more = VARIANTS[v]
        sets = (*args.set, *more, *(("train.cast_weights_once=true",) if cast else ()))
        swap = cast == "swap"
        r = run(args.config, args.batch, args.seq, compile_, ac, args.iters, sets, swap)
        r["variant"] = v
        if "matmul_bf16_tflops" in result:
            r["mfu_vs_measured_matmul"] = round(r["tflops"] / result["matmul_bf16_tflops"], 4)
        result["runs"].append(r)
        print(r, flush=True)
        write_result(args.out, result)


if __name__ == "__main__":
    main()
