"""How much of the all-to-all does the overlap engine hide? One MoE layer, forward + backward.

    PYTHONPATH=src torchrun --nproc_per_node=4 benchmarks/overlap_bench.py --out results/x.json
    PYTHONPATH=src torchrun --nproc_per_node=4 benchmarks/overlap_bench.py --smoke   # CPU, gloo

Expert parallelism over all ranks (dp=1, ep=4), 32768 tokens per rank, fp32 master weights with
bf16 autocast (as in training), two shapes: Mixtral-like (8 experts, top-2, hidden 4096, ffn
14336) and fine-grained (64 experts, top-8, hidden 2048, ffn 1408). Schedules: off (the plain
path), split_dw, chunks=2, chunks=4, auto (the planner's C), all (auto + split_dw).

Per schedule: a correctness check against `off` first (output, input grad and expert grads at
bf16 tolerance), then the median forward+backward ms, TFLOPS per GPU (3 passes x 2 x tokens x k
x 3 x H x F), and one timed step of the overlap timeline: exchange_ms (issue to completion,
summed over the layer's 4 exchanges) and exposed_ms (compute stream stalled in wait()). `off`
is timed on the plain path; its timeline comes from the C=1 engine, which runs the same
operations in the same order. The exchange alone (one dispatch-sized all-to-all, times 4) is
measured separately.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

for _k, _v in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ.setdefault(_k, _v)  # NVLink multicast off, before any process group exists

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import environment, time_cuda, write_result  # noqa: E402

from braid.exchange.nccl import NcclExchange  # noqa: E402
from braid.model.config import ModelConfig  # noqa: E402
from braid.moe.config import MoEConfig  # noqa: E402
from braid.moe.layer import MoE  # noqa: E402
from braid.overlap.config import OverlapConfig  # noqa: E402
from braid.overlap.pipeline import LayerOverlap  # noqa: E402
from braid.overlap.planner import CANDIDATES, choose_chunks, measure, predict_ms  # noqa: E402
from braid.overlap.session import enable_exchange_timing, layer_shape  # noqa: E402
from braid.overlap.streams import Clock, synchronize  # noqa: E402

SHAPES = {  # name: (experts, top_k, hidden, ffn)
    "mixtral_8e_top2": (8, 2, 4096, 14336),
    "fine_64e_top8": (64, 8, 2048, 1408),
}
SMOKE_SHAPES = {"smoke_8e_top2": (8, 2, 64, 96), "smoke_16e_top4": (16, 4, 32, 48)}
SCHEDULES = {  # name: (chunks, split_dw); None = the plain path
    "off": None,
    "split_dw": (1, True),
    "chunks2": (2, False),
    "chunks4": (4, False),
    "auto": ("auto", False),
    "all": ("auto", True),
}


def build(shape: tuple, device: torch.device, ep_group) -> MoE:
    E, k, H, F = shape
    cfg = MoEConfig(num_experts=E, top_k=k, expert_hidden=F, aux_loss_coef=0.0, z_loss_coef=0.0)
    with torch.device(device):
        moe = MoE(ModelConfig(dim=H), cfg)
    gen = torch.Generator(device=device).manual_seed(0)  # the same weights on every rank
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    moe.experts.shard(dist.get_rank(ep_group), dist.get_world_size(ep_group))
    moe.dispatcher.exchange = NcclExchange(ep_group, dist.group.WORLD)
    # NCCL's own per-collective durations for exchange_ms (on from the start, so every
    # schedule is timed under the same conditions).
    enable_exchange_timing(moe.dispatcher.exchange, device, report=True)
    return moe


def step(moe: MoE, x: torch.Tensor, g: torch.Tensor, amp) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward + backward (grads cleared first, left in place); the output and input grad."""
    for p in moe.parameters():
        p.grad = None
    x = x.detach().requires_grad_()
    with amp:
        y, _ = moe(x)
    y.backward(g)
    return y.detach(), x.grad


def grads_of(moe: MoE, x, g, amp) -> list[torch.Tensor]:
    y, dx = step(moe, x, g, amp)
    return [y.float(), dx.float()] + [p.grad.float() for p in moe.experts.parameters()]


def rel_err(got: list, ref: list) -> float:
    return max(
        float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
        for a, b in zip(got, ref, strict=True)
    )


def install(moe: MoE, schedule, plan_C: int, clock: Clock) -> int | None:
    if schedule is None:
        moe.overlap = None
        return None
    chunks, split = schedule
    C = plan_C if chunks == "auto" else chunks
    moe.overlap = LayerOverlap(0, C, split, clock)
    return C


def timeline_once(moe: MoE, x, g, amp, device) -> dict:
    """One step with the overlap timeline's timing on; its per-layer summary."""
    tl = moe.overlap.timeline
    tl.timing = True
    step(moe, x, g, amp)
    synchronize(device)
    tl.timing = False
    return tl.summary()


def exchange_alone(moe: MoE, x: torch.Tensor, iters: int) -> float:
    """One dispatch-sized all-to-all (even splits), ms; a layer's forward+backward has four."""
    ex, k = moe.dispatcher.exchange, moe.dispatcher.top_k
    rows = x.shape[0] * k // ex.size * ex.size
    buf = torch.randn(
        rows, x.shape[1], device=x.device, dtype=torch.bfloat16 if x.is_cuda else torch.float32
    )
    splits = [rows // ex.size] * ex.size
    return time_cuda(lambda: ex.move(buf, splits, splits).wait(), iters=iters)["median_ms"]


def bench_shape(
    name: str,
    shape: tuple,
    tokens: int,
    device,
    amp,
    iters: int,
    tol: float,
    log,
    trace_dir: str = "",
) -> dict:
    E, k, H, F = shape
    moe = build(shape, device, dist.group.WORLD)
    gen = torch.Generator(device=device).manual_seed(1 + dist.get_rank())
    x = torch.randn(tokens, H, device=device, generator=gen)
    g = torch.randn(tokens, H, device=device, generator=gen) * 1e-2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape_ = layer_shape(moe, tokens, dtype)
    cost = measure(shape_, moe.dispatcher.exchange, moe.experts, device, dtype)
    cands = tuple(c for c in CANDIDATES if c <= OverlapConfig().max_chunks)
    plans = {split: choose_chunks(shape_, split, cost, cands) for split in (False, True)}
    clock = Clock(device)
    ref = grads_of(moe, x, g, amp)
    flops = 3 * 2 * tokens * k * 3 * H * F
    out = {
        "shape": {"experts": E, "top_k": k, "hidden": H, "ffn": F, "tokens_per_rank": tokens},
        "cost_model": cost.__dict__,
        "exchange_alone_ms": exchange_alone(moe, x, iters),
        "predicted_ms_by_chunks": {f"split_dw={k}": v[2] for k, v in plans.items()},
        "schedules": {},
    }
    out["exchange_alone_x4_ms"] = 4 * out["exchange_alone_ms"]
    for sname, schedule in SCHEDULES.items():
        split = bool(schedule and schedule[1])
        C = install(moe, schedule, plans[split][0], clock)
        err = rel_err(grads_of(moe, x, g, amp), ref)
        if err > tol:
            raise SystemExit(f"{name}/{sname}: overlap changed results: rel err {err:.2e} > {tol}")
        t = time_cuda(lambda: step(moe, x, g, amp), iters=iters, warmup=2)
        if moe.overlap is None:  # the plain path has no timeline: time its C=1 twin once
            install(moe, (1, False), 1, clock)
        tl = timeline_once(moe, x, g, amp, device)
        if trace_dir and dist.get_rank() == 0 and sname in ("off", "all"):
            acts = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=acts) as prof:
                step(moe, x, g, amp)
                synchronize(device)
            prof.export_chrome_trace(str(Path(trace_dir) / f"{name}_{sname}_rank0.json"))
        elif trace_dir:
            step(moe, x, g, amp)  # one extra step per schedule on every rank, in lockstep
        row = {
            "chunks": C,
            "split_dw": split,
            "rel_err_vs_off": err,
            **t,
            "tflops_per_gpu": flops / (t["median_ms"] / 1e3) / 1e12,
            "exchange_ms": tl["exchange_ms"],
            "exposed_ms": tl["exposed_ms"],
            "exposed_fraction": tl["exposed_ms"] / max(tl["exchange_ms"], 1e-9),
            "timeline": tl,
        }
        row["predicted_ms"] = predict_ms(shape_, C or 1, split, cost)  # the planner's view
        out["schedules"][sname] = row
        log(
            f"{name:>16} {sname:>9}: C={C!s:>4} {t['median_ms']:9.2f} ms "
            f"(pred {row['predicted_ms']:8.2f}) "
            f"{row['tflops_per_gpu']:7.1f} TFLOPS/GPU  exchange {tl['exchange_ms']:8.2f} ms "
            f"exposed {tl['exposed_ms']:8.2f} ms ({100 * row['exposed_fraction']:5.1f}%)  "
            f"err {err:.1e}"
        )
    moe.overlap = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="", help="JSON result file (rank 0 writes it)")
    ap.add_argument("--smoke", action="store_true", help="CPU/gloo with tiny shapes")
    ap.add_argument("--tokens", type=int, default=0, help="tokens per rank (default 32768)")
    ap.add_argument("--iters", type=int, default=0)
    ap.add_argument("--trace", default="", help="directory for Chrome traces (off and all)")
    args = ap.parse_args()
    if args.smoke:
        dist.init_process_group("gloo")
        torch.set_num_threads(1)
        device, shapes, tokens, iters, tol = torch.device("cpu"), SMOKE_SHAPES, 96, 3, 1e-5
        amp = torch.autocast("cpu", enabled=False)
    else:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device)
        shapes, tokens, iters, tol = SHAPES, 32768, 5, 3e-2
        amp = torch.autocast("cuda", dtype=torch.bfloat16)
    tokens, iters = args.tokens or tokens, args.iters or iters
    is_main = dist.get_rank() == 0

    def log(line: str) -> None:
        if is_main:
            print(line, flush=True)

    world = dist.get_world_size()
    result = {
        "environment": environment(),
        "world": world,
        "ep": world,
        "smoke": args.smoke,
        "shapes": {},
    }
    for name, shape in shapes.items():
        result["shapes"][name] = bench_shape(
            name, shape, tokens, device, amp, iters, tol, log, args.trace
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if is_main and args.out:
        write_result(args.out, result)
        log(f"wrote {args.out}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
