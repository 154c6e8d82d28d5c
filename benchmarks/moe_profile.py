"""Where the time of one MoE layer goes on one GPU: the layer against its expert GEMMs alone.

    PYTHONPATH=src python benchmarks/moe_profile.py --out benchmarks/results/moe_profile.json
    PYTHONPATH=src python benchmarks/moe_profile.py --smoke      # CPU, tiny shapes

Question: how far is the single-process MoE layer (router, permutation, grouped SwiGLU GEMMs,
combine) from the speed of its six grouped GEMMs (forward x2, dX x2, dW x2) run back to back on
the same row groups? The difference is what routing, permutations, SwiGLU and casts cost; it is
the part of the expert-parallel layer that no exchange overlap can hide.

Shapes are the two of `moe_layer.py` at one rank's share of ep=4 work (32768 tokens, every
expert local, so each GEMM sees the same rows in total as one rank of ep=4 does). bf16
weights and inputs, balanced random routing. Per shape: median ms of forward+backward, of the
GEMMs alone, their ratio, TFLOPS of each (expert GEMM FLOPs only), and the 15 kernels with the
most CUDA time over two profiled iterations.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from common import environment, time_cuda, write_result  # noqa: E402

from braid.model.config import ModelConfig  # noqa: E402
from braid.moe.config import MoEConfig  # noqa: E402
from braid.moe.layer import MoE  # noqa: E402
from braid.ops.grouped_gemm import counts_to_offsets, gmm, gmm_wgrad  # noqa: E402

SHAPES = {  # name: (experts, top_k, hidden H, expert FFN F, tokens)
    "mixtral_8x_top2": (8, 2, 4096, 14336, 32768),
    "fine_64x_top8": (64, 8, 2048, 1408, 32768),
}
SMOKE = {"smoke_8x_top2": (8, 2, 64, 32, 256)}


def build(shape: tuple, device: torch.device, dtype: torch.dtype) -> MoE:
    E, k, H, F, _ = shape
    cfg = MoEConfig(num_experts=E, top_k=k, expert_hidden=F, aux_loss_coef=0.0, z_loss_coef=0.0)
    layer = MoE(ModelConfig(dim=H), cfg).to(device, dtype)
    with torch.no_grad():
        gen = torch.Generator(device="cpu").manual_seed(0)
        layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=gen) / H**0.5)
        layer.router.expert_bias.zero_()
        for w in (layer.experts.w13, layer.experts.w2):
            w.copy_(torch.randn(w.shape, generator=gen) * 0.02)
    return layer


def profile_shape(name: str, shape: tuple, device: torch.device, iters: int) -> dict:
    E, k, H, F, N = shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layer = build(shape, device, dtype)
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(1, N, H, generator=gen).to(device, dtype).requires_grad_(True)
    dy = torch.randn(1, N, H, generator=gen).to(device, dtype)

    def step():
        out, _ = layer(x)
        out.backward(dy)
        x.grad = None
        for p in layer.parameters():
            p.grad = None

    layer_t = time_cuda(step, iters=iters)
    with torch.no_grad():  # the step's own row groups
        idx = layer.router(x[0], lambda t: t).topk_idx_NK
        counts = torch.bincount(idx.flatten(), minlength=E)
    offs = counts_to_offsets(counts)
    R = int(counts.sum())
    a = torch.randn(R, H, device=device, dtype=dtype)
    h = torch.randn(R, F, device=device, dtype=dtype)
    g13 = torch.randn(R, 2 * F, device=device, dtype=dtype)
    w13, w2 = layer.experts.w13.detach(), layer.experts.w2.detach()
    impl = layer.experts.impl

    def gemms():
        gmm(a, w13, offs, impl)  # forward
        gmm(h, w2, offs, impl)
        gmm(a, w2.transpose(1, 2), offs, impl)  # dX of w2 (g [R, H] @ w2^T)
        gmm(g13, w13.transpose(1, 2), offs, impl)  # dX of w13
        gmm_wgrad(h, a, offs, impl)  # dW of w2 [E, F, H]
        gmm_wgrad(a, g13, offs, impl)  # dW of w13 [E, H, 2F]

    gemm_t = time_cuda(gemms, iters=iters)
    flops = 3 * 2 * N * k * 3 * H * F
    out = {
        "name": name,
        "experts": E,
        "top_k": k,
        "hidden": H,
        "ffn": F,
        "tokens": N,
        "rows": R,
        "layer_ms": round(layer_t["median_ms"], 3),
        "gemms_ms": round(gemm_t["median_ms"], 3),
        "layer_over_gemms": round(layer_t["median_ms"] / gemm_t["median_ms"], 3),
        "layer_tflops": round(flops / layer_t["median_ms"] / 1e9, 1),
        "gemms_tflops": round(flops / gemm_t["median_ms"] / 1e9, 1),
    }
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(2):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)
    out["top_kernels"] = [
        {"name": e.key[:90], "ms_per_step": round(getattr(e, key) / 2e3, 3), "calls": e.count // 2}
        for e in events[:15]
    ]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke or device.type != "cuda"
    result = {**environment(), "layers": []}
    for name, shape in (SMOKE if smoke else SHAPES).items():
        r = profile_shape(name, shape, device, 2 if smoke else args.iters)
        result["layers"].append(r)
        print({k: v for k, v in r.items() if k != "top_kernels"}, flush=True)
        for kern in r["top_kernels"]:
            print("   ", kern, flush=True)
        if args.out:
            write_result(args.out, result)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not result["layers"] or statistics.mean(r["layer_ms"] for r in result["layers"]) <= 0:
        sys.exit("no measurement")


if __name__ == "__main__":
    main()
