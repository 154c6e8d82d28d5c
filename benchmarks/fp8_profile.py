"""Kernel-time profile of one MoE layer's forward+backward, bf16 vs fp8 vs fp8 with fp8 dW,
on the shapes of benchmarks/fp8_layer.py (torch.profiler, CUDA kernels only, one step after
three warm-up steps): per variant the total kernel time and the 22 costliest kernels.

    PYTHONPATH=src python benchmarks/fp8_profile.py > benchmarks/results/fp8_profile_h100.txt

Prints text tables; where the time goes, not how fast (timings: benchmarks/fp8_layer.py).
"""

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from fp8_layer import SHAPES, build_layer  # noqa: E402

from braid.moe.fp8_dispatch import Fp8Send  # noqa: E402
from braid.ops.fp8_stats import Fp8Stats  # noqa: E402


def main() -> None:
    dev = torch.device("cuda")
    for name, shape in SHAPES.items():
        *_, H, _, N = shape
        layer = build_layer(shape, dev)
        x = torch.randn(1, N, H, device=dev, dtype=torch.bfloat16, requires_grad=True)
        gy = torch.randn(1, N, H, device=dev, dtype=torch.bfloat16)
        for prec in ("bf16", "fp8", "fp8_dw8"):
            stats = None if prec == "bf16" else Fp8Stats()
            layer.experts.fp8_stats, layer.experts.fp8_wgrad = stats, prec == "fp8_dw8"
            layer.dispatcher.send_fp8 = None if stats is None else Fp8Send(stats)

            def step(x=x, layer=layer, gy=gy):
                x.grad = None
                layer.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y, _ = layer(x)
                y.backward(gy)

            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as p:
                step()
                torch.cuda.synchronize()
            ev = [e for e in p.key_averages() if e.device_type.name == "CUDA"]
            tot = sum(e.self_device_time_total for e in ev) / 1e3
            print(f"=== {name} {prec} total kernel ms {tot:.1f}")
            for e in sorted(ev, key=lambda e: -e.self_device_time_total)[:22]:
                print(f"{e.self_device_time_total / 1e3:8.2f} ms x{e.count:3d}  {e.key[:110]}")


if __name__ == "__main__":
    main()
