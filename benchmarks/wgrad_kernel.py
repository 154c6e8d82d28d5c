"""The routed experts' dW kernel (`braid.ops.wgrad_triton`) against `F.grouped_mm` + the cast.

    PYTHONPATH=src python benchmarks/wgrad_kernel.py --out benchmarks/results/wgrad_kernel_h100.json

Per shape (experts E, rows R spread evenly, in-features D, out-features F: the layer
benchmark's Mixtral-like and fine-grained experts, `moonlet`'s and `medium`'s at batch 2 x 4096):
  grouped_mm        bf16 dW alone (what the fp32 grad is converted from)
  grouped_mm_cast   bf16 dW, then `grad_cast.into_fp32` into a new fp32 grad (the plain path)
  grouped_mm_add    ... added into an existing fp32 grad (a later micro-batch)
  triton            the kernel writing the fp32 grad (every tile config of `--configs`)
  triton_add        the kernel adding into the existing fp32 grad
and for four chunks of tokens (the joined dW of `braid.overlap.joined_experts`): the gather
path (`_joined_dw`: expert-major gather, grouped_mm, cast) against the kernel reading the four
chunks in place. Correctness first: every kernel result against an fp64 sum of the same bf16
products (relative error in the JSON).
`--parts layer`: one MoE layer forward+backward (32768 tokens under bf16 autocast, fp32
weights: the plain path's routed dW written in fp32 by the kernel) against the same layer with
the kernel switched off (`wgrad_triton.usable` patched: grouped_mm + cast), alternating rounds
of 8 steps, median of the rounds, and the two runs' expert grads compared.
Needs a CUDA GPU with Triton.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import environment, time_cuda, write_result  # noqa: E402

from braid.ops import wgrad_triton  # noqa: E402
from braid.ops.grad_cast import into_fp32  # noqa: E402
from braid.overlap.joined_experts import _joined_dw  # noqa: E402

SHAPES = {  # E, R, D, F
    "mixtral_w13": (8, 65536, 4096, 28672),
    "mixtral_w2": (8, 65536, 14336, 4096),
    "fine_w13": (64, 262144, 2048, 2816),
    "moonlet_w13": (64, 49152, 2048, 2816),
    "moonlet_w2": (64, 49152, 1408, 2048),
    "medium_w13": (8, 16384, 4096, 6144),
    "medium_w2": (8, 16384, 3072, 4096),
}
JOINED = ("mixtral_w13", "mixtral_w2", "medium_w13")
CONFIGS = [
    wgrad_triton.CONFIG,
    (128, 256, 64, 8, 8, 3),
    (128, 128, 64, 8, 8, 3),
    (256, 128, 64, 8, 8, 3),
    (128, 128, 64, 8, 4, 4),
]


def _ms(fn) -> float:
    return round(time_cuda(fn, iters=10)["median_ms"], 3)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


def _reference(xs, gs, offs) -> torch.Tensor:
    """The fp64 sum of the bf16 products, expert by expert (on a slice of columns: cheap)."""
    out = 0.0
    for x, g, o in zip(xs, gs, offs, strict=True):
        bounds = [0, *o.tolist()]
        pairs = zip(bounds[:-1], bounds[1:], strict=True)
        out = out + torch.stack([x[a:b].double().t() @ g[a:b].double() for a, b in pairs])
    return out


def _operands(E: int, R: int, D: int, F_: int, chunks: int = 1):
    xs, gs, offs = [], [], []
    for _ in range(chunks):
        r = R // chunks
        xs.append(torch.randn(r, D, device="cuda").bfloat16())
        gs.append(torch.randn(r, F_, device="cuda").bfloat16())
        offs.append(torch.cumsum(torch.full((E,), r // E, device="cuda"), 0).to(torch.int32))
    return xs, gs, offs


def run_shape(E: int, R: int, D: int, F_: int) -> dict:
    (x,), (g,), (offs,) = _operands(E, R, D, F_)
    acc = torch.zeros(E, D, F_, device="cuda")
    out = {
        "grouped_mm": _ms(lambda: F.grouped_mm(x.t(), g, offs=offs)),
        "grouped_mm_cast": _ms(lambda: into_fp32(None, F.grouped_mm(x.t(), g, offs=offs))),
        "grouped_mm_add": _ms(lambda: into_fp32(acc, F.grouped_mm(x.t(), g, offs=offs))),
    }
    for cfg in CONFIGS:
        name = "triton_" + "x".join(map(str, cfg))
        out[name] = _ms(lambda cfg=cfg: wgrad_triton.wgrad_fp32([x], [g], [offs], config=cfg))
    out["triton_add"] = _ms(lambda: wgrad_triton.wgrad_fp32([x], [g], [offs], acc=acc))
    cols = slice(0, 64)  # the reference on 64 output columns
    got = wgrad_triton.wgrad_fp32([x], [g], [offs])[..., cols]
    out["rel_err_vs_fp64"] = _rel(got, _reference([x], [g[:, cols]], [offs]))
    return out


def run_joined(E: int, R: int, D: int, F_: int, chunks: int = 4) -> dict:
    xs, gs, offs = _operands(E, R, D, F_, chunks)

    def gather():
        return into_fp32(None, _joined_dw(list(zip(xs, gs, offs, strict=True)), "grouped"))

    out = {
        "chunks": chunks,
        "gather_grouped_mm_cast": _ms(gather),
        "triton_in_place": _ms(lambda: wgrad_triton.wgrad_fp32(xs, gs, offs)),
    }
    cols = slice(0, 64)
    got = wgrad_triton.wgrad_fp32(xs, gs, offs)[..., cols]
    out["rel_err_vs_fp64"] = _rel(got, _reference(xs, [t[:, cols] for t in gs], offs))
    return out


LAYERS = {"mixtral_8e_top2": (8, 2, 4096, 14336), "fine_64e_top8": (64, 8, 2048, 1408)}


def run_layer(E: int, k: int, H: int, F_: int, rounds: int = 3) -> dict:
    from braid.model.config import ModelConfig
    from braid.moe.config import MoEConfig
    from braid.moe.layer import MoE

    cfg = MoEConfig(num_experts=E, top_k=k, expert_hidden=F_, aux_loss_coef=0.0, z_loss_coef=0.0)
    with torch.device("cuda"):
        moe = MoE(ModelConfig(dim=H), cfg)
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    x = torch.randn(32768, H, device="cuda", generator=gen)
    dy = torch.randn(32768, H, device="cuda", generator=gen) * 1e-2

    def step() -> None:
        for p in moe.parameters():
            p.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _ = moe(x.detach().requires_grad_())
        y.backward(dy)

    usable, ms, grads = wgrad_triton.usable, {"kernel": [], "cast": []}, {}
    try:
        for r in range(rounds):
            for mode in ("kernel", "cast") if r % 2 == 0 else ("cast", "kernel"):
                wgrad_triton.usable = usable if mode == "kernel" else (lambda *a: False)
                ms[mode].append(round(time_cuda(step, iters=8)["median_ms"], 3))
                grads[mode] = [moe.experts.w13.grad.clone(), moe.experts.w2.grad.clone()]
    finally:
        wgrad_triton.usable = usable
    med = {m: sorted(v)[len(v) // 2] for m, v in ms.items()}
    pairs = zip(grads["kernel"], grads["cast"], strict=True)
    return {
        "kernel_ms": med["kernel"],
        "cast_ms": med["cast"],
        "speedup": round(med["cast"] / med["kernel"], 4),
        "rounds_ms": ms,
        "grad_rel_diff": max(_rel(a, b) for a, b in pairs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="", help="JSON result file")
    ap.add_argument("--parts", default="kernel", help="comma list of: kernel, layer")
    args = ap.parse_args()
    parts = args.parts.split(",")
    if unknown := set(parts) - {"kernel", "layer"}:
        sys.exit(f"wgrad_kernel: --parts {sorted(unknown)} unknown; expected kernel, layer")
    probe = torch.empty(
        8, 8, dtype=torch.bfloat16, device="cuda" if torch.cuda.is_available() else "cpu"
    )
    if not wgrad_triton.available([probe], [probe]):
        sys.exit("wgrad_kernel: needs a CUDA GPU with Triton (the kernel has no other backend)")
    torch.manual_seed(0)
    res = {**environment(), "config": list(wgrad_triton.CONFIG), "shapes": {}, "joined": {}}
    res["layer"] = {}
    for name, shape in LAYERS.items() if "layer" in parts else ():
        res["layer"][name] = run_layer(*shape)
        print("layer", name, res["layer"][name], flush=True)
        torch.cuda.empty_cache()
    for name, shape in SHAPES.items() if "kernel" in parts else ():
        res["shapes"][name] = {"E_R_D_F": list(shape), **run_shape(*shape)}
        print(name, res["shapes"][name], flush=True)
        torch.cuda.empty_cache()
    for name in JOINED if "kernel" in parts else ():
        res["joined"][name] = run_joined(*SHAPES[name])
        print("joined", name, res["joined"][name], flush=True)
        torch.cuda.empty_cache()
    if args.out:
        write_result(args.out, res)


if __name__ == "__main__":
    main()
