"""Where one whole training step's GPU time goes: kernels of one forward + backward of a Braid
model (the step of `model_step.py`), summed by kind, with the costliest kernels and the
operators that launched the most kernel time.

    PYTHONPATH=src python benchmarks/step_profile.py --config medium --batch 2 \
        --out benchmarks/results/step_profile_medium_h200.json
    PYTHONPATH=src python benchmarks/step_profile.py --config tiny --batch 1 --seq 64 --eager

Kinds are read off kernel names: NCCL, attention (cuDNN, flash), GEMMs (cuBLAS, CUTLASS,
grouped), compiled kernels (Inductor's `triton_*`, named after the operators they fuse),
Braid's own Triton kernels, aten's copy, reduction and elementwise kernels, the rest. One
step is profiled after warm-up (compiled steps compile in warm-up); the step's unprofiled
median is timed too.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from common import environment, time_cuda, write_result  # noqa: E402
from model_step import make_step  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

KINDS = (  # first match wins; names lower-cased
    ("communication", r"nccl"),
    ("gemm", r"^triton_tem_"),  # Inductor's GEMM templates
    ("compiled", r"^triton_"),  # Inductor's fused kernels, named after the ops they fuse
    ("attention", r"sdpa|flash|fmha|attention|cudnn"),
    ("gemm", r"gemm|cutlass|nvjet|xmma|sm90_|grouped_mm|_mm_|matmul"),
    ("braid_triton", r"^_\w+_kernel"),
    ("copy", r"copy|memcpy|memset|cat_|fill"),
    ("reduce", r"reduce|softmax|norm|cross_entropy|nll|scan|sort|topk|index|scatter|gather"),
    ("elementwise", r"elementwise"),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="medium")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--eager", action="store_true", help="without train.compile")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--out", default=None)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    step, _ = make_step(args.config, args.batch, args.seq, not args.eager, False, tuple(args.set))
    t = time_cuda(step, iters=args.iters, warmup=4)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    dev_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    kernels = [e for e in events if e.device_type.name == "CUDA"] if cuda else []
    by_kind: dict[str, float] = defaultdict(float)
    for e in kernels:
        by_kind[kind_of(e.key)] += e.self_device_time_total / 1e3
    total = sum(by_kind.values())
    ops = [e for e in events if e.device_type.name == "CPU" and getattr(e, dev_key, 0) > 0]
    result = {
        "env": environment(),
        "config": args.config,
        "batch": args.batch,
        "seq_len": args.seq,
        "compile": not args.eager,
        "overrides": args.set,
        "step_median_ms": round(t["median_ms"], 2),
        "kernel_ms": round(total, 2),
        "by_kind_ms": {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels": [
            {
                "ms": round(e.self_device_time_total / 1e3, 3),
                "calls": e.count,
                "kind": kind_of(e.key),
                "name": e.key[:160],
            }
            for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[: args.top]
        ],
        "top_ops_self_kernel_ms": [
            {"ms": round(getattr(e, dev_key) / 1e3, 3), "calls": e.count, "op": e.key[:120]}
            for e in sorted(ops, key=lambda e: -getattr(e, dev_key))[: args.top]
        ],
    }
    print(f"step {t['median_ms']:.1f} ms, kernels {total:.1f} ms", flush=True)
    for k, v in result["by_kind_ms"].items():
        print(f"  {k:13s} {v:8.2f} ms")
    for row in result["top_kernels"]:
        print(f"  {row['ms']:8.3f} ms x{row['calls']:4d} {row['kind']:12s} {row['name'][:110]}")
    print("operators by the kernel time they launched:")
    for row in result["top_ops_self_kernel_ms"]:
        print(f"  {row['ms']:8.3f} ms x{row['calls']:4d} {row['op']}")
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
