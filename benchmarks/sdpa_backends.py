"""Which SDPA backend for full causal attention (`model.sdpa_backend`), measured on one GPU.

    PYTHONPATH=src python benchmarks/sdpa_backends.py --out benchmarks/results/sdpa_backends.json
    PYTHONPATH=src python benchmarks/sdpa_backends.py --smoke     # CPU, tiny, a few seconds

Two parts, in one run:
- kernels: causal SDPA forward + backward, bf16, at the attention shapes of `medium` (32 heads
  of 128), `moonlet` (16 of 128) and a GQA shape (32 query heads, 8 kv heads), each backend
  alone (`sdpa_kernel([backend])`); every backend's output and input grads are compared with
  the flash backend's (relative max error) before its time counts;
- steps: a compiled forward + backward of `--config` (default `medium` at `--layers` layers)
  with each `model.sdpa_backend` setting (`benchmarks/model_step.py`'s step and FLOP count).
A backend that cannot run a shape is recorded as `{"error": ...}`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import environment, time_cuda, write_result  # noqa: E402
from model_step import run as run_step  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

SHAPES = {  # name: (batch, tokens, query heads, kv heads, head size)
    "medium": (2, 4096, 32, 32, 128),
    "moonlet": (2, 4096, 16, 16, 128),
    "gqa_32q_8kv": (2, 4096, 32, 8, 128),
}
SMOKE = {"smoke": (1, 64, 4, 2, 16)}
BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")


def kernel_rows(shape: tuple, iters: int, device: torch.device) -> dict:
    B, T, H, K, D = shape
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(B, h, T, D, device=device, generator=g).to(dt).requires_grad_()
        for h in (H, K, K)
    )
    do = torch.randn(B, H, T, D, device=device, generator=g).to(dt)
    backends = BACKENDS if device.type == "cuda" else ("MATH",)
    rows, ref = {}, None
    for name in backends:
        try:
            with sdpa_kernel([getattr(SDPBackend, name)]):

                def fwd_bwd():
                    q.grad = k.grad = v.grad = None
                    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != K)
                    o.backward(do)
                    return o

                got = [fwd_bwd().detach().float()] + [t.grad.float() for t in (q, k, v)]
                t = time_cuda(fwd_bwd, iters=iters, warmup=3)
        except RuntimeError as e:
            rows[name] = {"error": str(e).splitlines()[0][:200]}
            continue
        ref = ref or got
        flops = 3.5 * 4 * B * H * T * T * D / 2  # causal: forward 2 GEMMs, backward 2.5x
        rows[name] = {
            **{k2: round(v2, 3) for k2, v2 in t.items()},
            "tflops": round(flops / t["median_ms"] / 1e9, 1),
            "rel_err_vs_first": [
                round(float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)), 5)
                for a, b in zip(got, ref, strict=True)
            ],
        }
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/sdpa_backends.json")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--config", default="medium")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--settings", default="torch,cudnn,flash",
                   help="model.sdpa_backend values to step")  # fmt: skip
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    result: dict = {**environment(), "kernels": {}, "steps": {}}
    for name, shape in (SMOKE if args.smoke else SHAPES).items():
        result["kernels"][name] = kernel_rows(shape, 2 if args.smoke else args.iters, device)
        print(name, result["kernels"][name], flush=True)
        write_result(args.out, result)
    if device.type == "cuda":
        for s in args.settings.split(","):
            sets = (f"model.n_layers={args.layers}", f"model.sdpa_backend={s}")
            r = run_step(args.config, 2, 4096, True, False, 8, sets)
            result["steps"][s] = r
            print(s, {k: r[k] for k in ("median_ms", "tflops")}, flush=True)
            write_result(args.out, result)
    if len(result["steps"]) > 1:
        first, *rest = result["steps"]
        base = result["steps"][first]["median_ms"]
        result["step_speedup_vs_" + first] = {
            s: round(base / result["steps"][s]["median_ms"], 3) for s in rest
        }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
