"""fp8 vs bf16 on one GPU: the MoE layer (forward + backward) and a compiled training step.

    PYTHONPATH=src python benchmarks/fp8_layer.py --out benchmarks/results/fp8_layer_h200.json
    PYTHONPATH=src python benchmarks/fp8_layer.py --smoke --out /tmp/fp8_smoke.json   # CPU

Part 1, layer: one MoE layer, all experts local, 32768 tokens, fp32 master weights under bf16
autocast (as in training), the same weights, inputs, router and output gradient for every variant;
only the expert GEMMs change: bf16; fp8 (train.precision=fp8: rowwise e4m3
`_scaled_grouped_mm` for forward and dX, bf16 dW); fp8_dw8 (train.fp8_wgrad=fp8 as well: dW
in the 2d-2d fp8 grouped GEMM). Shapes: Mixtral-like (8 experts top-2,
H 4096, F 14336) and fine-grained (64 experts top-8, H 2048, F 1408). Reported: median ms of
forward+backward (CUDA events), the speedups over bf16, and the agreement of fp8 with bf16: relative
Frobenius errors of the output, the input gradient and the expert weight gradients, which must
stay below LAYER_TOL (a failed check is recorded in the JSON and makes the exit code 1).
Part 2, step: forward + backward of the `medium` model with train.compile, batch 2 x 4096, bf16
vs fp8 (every linear but the output head and the router, and the experts) vs fp8_dw8
(train.fp8_wgrad=fp8 too), tokens/s. By default with --step-layers 8 of medium's 30 (the same
layer shapes, 4 of them MoE; three compiles and the timing then fit the six-minute budget with
the layer part); --step-layers 30 runs the whole model. The losses on the same batch and
initial weights must agree within STEP_TOL (relative).
--smoke: tiny shapes on CPU (fp32 vs the fp32 emulation of fp8), the same checks and fields.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from common import environment, time_cuda, write_result  # noqa: E402

from braid.config import load_config  # noqa: E402
from braid.moe.fp8_dispatch import Fp8Send  # noqa: E402
from braid.moe.layer import MoE  # noqa: E402
from braid.ops.fp8_stats import Fp8Stats  # noqa: E402
from braid.parallel.mesh import ParallelContext  # noqa: E402
from braid.train.loss import autocast, loss_fn  # noqa: E402
from braid.train.model_setup import build_model  # noqa: E402

SHAPES = {  # name: (experts, top_k, hidden H, expert FFN F, tokens)
    "mixtral_8x_top2": (8, 2, 4096, 14336, 32768),
    "fine_64x_top8": (64, 8, 2048, 1408, 32768),
}
SMOKE_SHAPES = {"smoke_8x_top2": (8, 2, 64, 96, 512), "smoke_16x_top4": (16, 4, 32, 48, 512)}
# Stated agreement of fp8 with bf16 (relative Frobenius error): e4m3 keeps 4 significant bits,
# so each quantised operand carries ~2.5% rms error (SQNR ~32 dB), and the layer chains two
# GEMMs of two quantised operands each. Measured in --smoke (emulation vs fp32): 6.0-6.6% for
# the output and every gradient.
LAYER_TOL = {"out": 0.1, "dx": 0.12, "dw13": 0.12, "dw2": 0.12}  # fp8_dw8: dW 6.6-6.7% measured
STEP_TOL = 0.01  # losses of the first step, same weights and batch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def build_layer(shape: tuple, dev: torch.device) -> MoE:
    """The MoE layer of `shape` (no shared experts), its router and expert weights N(0, 0.02)
    from seed 0: the same layer for every variant (and for `fp8_profile.py`)."""
    E, K, H, F, _ = shape
    cfg = load_config(
        None,
        [
            f"--model.dim={H}",
            "--model.n_heads=1",
            f"--moe.num_experts={E}",
            f"--moe.top_k={K}",
            f"--moe.expert_hidden={F}",
            "--moe.num_shared_experts=0",
        ],
    )
    torch.manual_seed(0)
    layer = MoE(cfg.model, cfg.moe).to(dev)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.02)
        layer.experts.w13.normal_(0, 0.02)
        layer.experts.w2.normal_(0, 0.02)
    return layer


def layer_case(shape: tuple, dev: torch.device, iters: int) -> dict:
    E, K, H, F, N = shape
    layer = build_layer(shape, dev)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    x = torch.randn(1, N, H, device=dev, dtype=dtype, requires_grad=True)
    gy = torch.randn(1, N, H, device=dev, dtype=dtype)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        with amp:
            y, _ = layer(x)
        y.backward(gy)
        return y

    out: dict = {"experts": E, "top_k": K, "hidden": H, "ffn": F, "tokens": N}
    grads = {}
    for prec in ("bf16", "fp8", "fp8_dw8"):
        stats = None if prec == "bf16" else Fp8Stats()  # as braid.parallel.fp8 sets it up
        layer.experts.fp8_stats, layer.experts.fp8_wgrad = stats, prec == "fp8_dw8"
        layer.dispatcher.send_fp8 = None if stats is None else Fp8Send(stats)
        y = step()
        grads[prec] = (y.detach(), x.grad, layer.experts.w13.grad, layer.experts.w2.grad)
        t = time_cuda(step, iters=iters, warmup=3)
        out[f"{prec}_ms"] = round(t["median_ms"], 3)
        out[f"{prec}_min_ms"] = round(t["min_ms"], 3)
        flops = 3 * 2 * N * K * 3 * H * F  # fwd + dX + dW of the three expert GEMMs
        out[f"{prec}_expert_tflops"] = round(flops / (t["median_ms"] / 1e3) / 1e12, 1)
        if dev.type == "cuda":
            out[f"{prec}_max_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
    out["speedup"] = round(out["bf16_ms"] / out["fp8_ms"], 3)
    out["speedup_dw8"] = round(out["bf16_ms"] / out["fp8_dw8_ms"], 3)
    agrees = True
    for prec in ("fp8", "fp8_dw8"):
        pairs = zip(LAYER_TOL, grads[prec], grads["bf16"], strict=True)
        errs = {k: rel(a, b) for k, a, b in pairs}
        out[f"rel_err_{prec}_vs_bf16"] = {k: round(v, 5) for k, v in errs.items()}
        agrees = agrees and all(errs[k] < LAYER_TOL[k] for k in LAYER_TOL)
    out["agrees"] = agrees
    return out


def _step_run(
    config: str,
    prec: str,
    layers: int,
    batch: int,
    seq: int,
    dev: torch.device,
    iters: int,
    extra: list[str],
) -> tuple[float, dict]:
    """(first loss, timing) of one variant (bf16, fp8, fp8_dw8); the model is freed on return."""
    compile_ = str(dev.type == "cuda").lower()
    precision = ["--train.precision=bf16"] if prec == "bf16" else ["--train.precision=fp8"]
    if prec == "fp8_dw8":
        precision.append("--train.fp8_wgrad=fp8")
    cfg = load_config(
        config,
        [
            f"--model.n_layers={layers}",
            f"--train.seq_len={seq}",
            f"--train.compile={compile_}",
            "--parallel.ep=1",
            *precision,
            *extra,
        ],
    )
    ctx = ParallelContext(rank=0, world=1, local_rank=0, device=dev)
    model = build_model(cfg, ctx)
    amp = autocast(cfg, dev)
    gen = torch.Generator(dev).manual_seed(0)
    x = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1), device=dev, generator=gen)

    def step():
        loss, _ = loss_fn(model, x[:, :-1], x[:, 1:], cfg, amp)
        loss.backward()
        for p in model.parameters():
            p.grad = None
        return loss

    first = step().item()
    return first, time_cuda(step, iters=iters, warmup=3)


def step_case(
    config: str,
    layers: int,
    batch: int,
    seq: int,
    dev: torch.device,
    iters: int,
    extra: list[str],
    variants: list[str],
) -> dict:
    out: dict = {
        "config": config,
        "n_layers": layers,
        "batch": batch,
        "seq_len": seq,
        "compile": dev.type == "cuda",
    }
    losses = {}
    for prec in variants:
        losses[prec], t = _step_run(config, prec, layers, batch, seq, dev, iters, extra)
        out[f"{prec}_ms"] = round(t["median_ms"], 2)
        out[f"{prec}_tokens_per_s"] = round(batch * seq / (t["median_ms"] / 1e3))
        if dev.type == "cuda":
            out[f"{prec}_max_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        print(prec, {k: v for k, v in out.items() if k.startswith(prec)}, flush=True)
    out["loss"] = {k: round(v, 5) for k, v in losses.items()}
    agrees = True
    for prec in variants[1:]:
        out[f"speedup_{prec}"] = round(out[f"{prec}_tokens_per_s"] / out["bf16_tokens_per_s"], 3)
        agrees = agrees and abs(losses[prec] - losses["bf16"]) <= STEP_TOL * abs(losses["bf16"])
    out["agrees"] = agrees
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/fp8_layer.json")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (CI)")
    p.add_argument("--parts", default="layer,step")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--step-layers", type=int, default=8)
    p.add_argument("--step-variants", default="bf16,fp8,fp8_dw8", help="bf16 first")
    args = p.parse_args()
    dev = torch.device("cpu" if args.smoke else "cuda")
    env = environment()
    env["command"] = "PYTHONPATH=src " + env["command"].replace("python3", "python")
    result: dict = {**env, "parts": args.parts.split(","), "layer": {}, "step": None}
    if "layer" in result["parts"]:
        for name, shape in (SMOKE_SHAPES if args.smoke else SHAPES).items():
            result["layer"][name] = layer_case(shape, dev, 2 if args.smoke else args.iters)
            print(name, result["layer"][name], flush=True)
            write_result(args.out, result)
    if "step" in result["parts"]:
        if args.smoke:
            variants = args.step_variants.split(",")
            r = step_case("tiny", 2, 2, 64, dev, 2, ["--moe.num_shared_experts=1"], variants)
        else:
            variants = args.step_variants.split(",")
            r = step_case("medium", args.step_layers, 2, 4096, dev, args.iters, [], variants)
        result["step"] = r
        print("step", r, flush=True)
    checks = [r["agrees"] for r in result["layer"].values()]
    checks += [result["step"]["agrees"]] if result["step"] else []
    result["all_agree"] = all(checks)
    result["complete"] = True
    write_result(args.out, result)
    return 0 if result["all_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
