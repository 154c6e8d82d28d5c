"""How much of the all-to-all does the overlap engine hide? One MoE layer, and a training step.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=src \
        torchrun --standalone --nproc_per_node=4 benchmarks/overlap_bench.py --out results/x.json
    OMP_NUM_THREADS=1 PYTHONPATH=src torchrun --standalone --nproc_per_node=4 \
        benchmarks/overlap_bench.py --smoke --out /tmp/o.json          # CPU, gloo, tiny shapes

Expert parallelism over all ranks (dp=1, ep=world), fp32 master weights with bf16 autocast (as in
training). `--parts layer,train` picks what runs; rank 0 rewrites the JSON after every shape and
every training mode (`complete` is false until the end), so a partial run leaves a valid file.

Part `layer`: one MoE layer forward + backward, 32768 tokens per rank, two shapes: Mixtral-like
(8 experts, top-2, hidden 4096, ffn 14336) and fine-grained (64 experts, top-8, hidden 2048, ffn
1408). Schedules: off (the plain path), split_dw, chunks2, chunks4, auto (the planner's C), all
(auto + split_dw). Per shape: `exchange_alone_ms`, the four all_to_alls of off's step (dispatch
and combine, forward and backward, at that step's splits and dtypes) timed by themselves
(benchmarks/overlap_exchange.py); `cost_model` and `predicted_ms_by_chunks` (the planner's view).
Per schedule (`schedules.<name>`):
  rel_err_vs_off   output, input grad and expert grads against off (checked first; bf16 3e-2)
  median_ms        forward + backward, the slowest rank's median (min_ms/max_ms: rank 0's)
  tflops_per_gpu   3 passes x 2 x tokens x k x 3 x H x F / median (expert GEMMs only)
  exchange_ms      overlap timeline, one step: issue to completion of the layer's exchanges
                   (NCCL's own durations), summed; `exposed_ms`: compute stream stalled in wait
  exposed_fraction             exposed_ms / exchange_ms (the same step's exchanges)
  exposed_over_exchange_alone  exposed_ms / exchange_alone_ms (the target: <= 0.10)
  slower_than_off  median_ms / off's median_ms - 1 (negative: faster; the target: <= 0.02)
  predicted_ms     the planner's prediction for this C and split
`off` is timed on the plain path; its timeline comes from the C=1 engine, which runs the same
operations in the same order.

Part `train` (benchmarks/overlap_train_step.py): forward + backward + AdamW step of the whole
model for `medium` (7.4B, 8 experts top-2, 15 MoE layers) and `moonlet` (7.3B, 64 experts top-6
+ 2 shared, 12 MoE layers), batch 2 x 4096 tokens per rank (`--train-layers N` overrides the
depth, `--train-override=--a.b=c` any setting; `n_layers`, `layers_override` and `overrides` are
recorded), modes off / split_dw / chunks2 / all (auto + split_dw). Per config:
`exchange_alone_ms` (every movement of off's first step, alone), `reference_losses` (off's first
two steps), max_mem_gib; per mode (`modes.<name>`): `losses` of the first two steps from the same
weights (must equal off's, fp32 1e-5 / bf16 5e-3: the forward, and the gradients through one
AdamW step), median_ms, tokens_per_s (global), tflops_per_gpu and mfu_vs_989 (training FLOPs
per token from braid.info.arithmetic), exchange_ms / exposed_ms / dW_ms summed over the MoE
layers of one timed step, exposed_fraction, exposed_over_exchange_alone, slower_than_off,
chunks (the C of each layer).

`targets` restates the issue's two targets against the numbers: exposed <= 10% of the exchange
alone on the fine-grained shape (layer fine_64e_top8, train moonlet), and every mode within 2%
of off; `off_exposed_share` (off's exposed ms / its step ms) says where there is little to hide.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
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
from overlap_exchange import record, slowest, time_alone  # noqa: E402
from overlap_sim import layer_step  # noqa: E402
from overlap_train_step import TRAIN_CONFIGS, bench_config  # noqa: E402

from braid.exchange.config import ExchangeConfig  # noqa: E402
from braid.exchange.nccl import NcclExchange, group_options  # noqa: E402
from braid.model.config import ModelConfig  # noqa: E402
from braid.moe.config import MoEConfig  # noqa: E402
from braid.moe.layer import MoE  # noqa: E402
from braid.overlap.config import OverlapConfig  # noqa: E402
from braid.overlap.engine import LayerOverlap  # noqa: E402
from braid.overlap.measure import measure  # noqa: E402
from braid.overlap.planner import CANDIDATES, choose_chunks, predict_ms  # noqa: E402
from braid.overlap.session import layer_shape  # noqa: E402
from braid.overlap.streams import Clock, synchronize  # noqa: E402

SHAPES = {  # name: (experts, top_k, hidden, ffn)
    "mixtral_8e_top2": (8, 2, 4096, 14336),
    "fine_64e_top8": (64, 8, 2048, 1408),
}
SMOKE_SHAPES = {"smoke_8e_top2": (8, 2, 64, 96), "smoke_16e_top4": (16, 4, 32, 48)}
FINE = ("fine_64e_top8", "smoke_16e_top4", "moonlet")  # the fine-grained rows of `targets`
SCHEDULES = {  # name: (chunks, split_dw); None = the plain path
    "off": None,
    "split_dw": (1, True),
    "chunks2": (2, False),
    "chunks4": (4, False),
    "auto": ("auto", False),
    "all": ("auto", True),
}
EXPOSED_TARGET, SLOWER_TARGET = 0.10, 0.02


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
    moe.dispatcher.exchange.enable_timing()
    return moe


def step(moe: MoE, x: torch.Tensor, g: torch.Tensor, amp) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward + backward (grads cleared first, left in place); the output and input grad."""
    y, xx = layer_step(moe, x, g, amp)
    return y.detach(), xx.grad


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


def bench_shape(name: str, shape: tuple, tokens: int, device, amp, args, tol: float, log) -> dict:
    E, k, H, F = shape
    iters, trace_dir = args.iters, args.trace
    moe = build(shape, device, args.ep_group)
    gen = torch.Generator(device=device).manual_seed(1 + dist.get_rank())
    x = torch.randn(tokens, H, device=device, generator=gen)
    g = torch.randn(tokens, H, device=device, generator=gen) * 1e-2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape_ = layer_shape(moe, tokens, dtype)
    cost = measure(shape_, moe.dispatcher.exchange, moe.experts, device, dtype)
    cands = tuple(c for c in CANDIDATES if c <= OverlapConfig().max_chunks)
    plans = {split: choose_chunks(shape_, split, cost, cands) for split in (False, True)}
    clock = Clock(device)
    with record(moe.dispatcher.exchange) as calls:  # off's step: its four movements
        ref = grads_of(moe, x, g, amp)
    flops = 3 * 2 * tokens * k * 3 * H * F
    out = {
        "shape": {"experts": E, "top_k": k, "hidden": H, "ffn": F, "tokens_per_rank": tokens},
        "cost_model": cost.__dict__,
        **time_alone(moe.dispatcher.exchange, calls, device, iters),
        "predicted_ms_by_chunks": {f"split_dw={k}": v[2] for k, v in plans.items()},
        "schedules": {},
    }
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
        med = slowest(t["median_ms"], device)
        exchange_ms, exposed_ms = (
            slowest(tl["exchange_ms"], device),
            slowest(tl["exposed_ms"], device),
        )
        row = {
            "chunks": C,
            "split_dw": split,
            "rel_err_vs_off": err,
            **t,
            "median_ms": med,
            "tflops_per_gpu": flops / (med / 1e3) / 1e12,
            "exchange_ms": exchange_ms,
            "exposed_ms": exposed_ms,
            "exposed_fraction": exposed_ms / max(exchange_ms, 1e-9),
            "exposed_over_exchange_alone": exposed_ms / max(out["exchange_alone_ms"], 1e-9),
            "slower_than_off": med / out["schedules"]["off"]["median_ms"] - 1 if C else 0.0,
            "timeline": tl,
        }
        row["predicted_ms"] = predict_ms(shape_, C or 1, split, cost)  # the planner's view
        out["schedules"][sname] = row
        log(
            f"{name:>16} {sname:>9}: C={C!s:>4} {med:9.2f} ms "
            f"(pred {row['predicted_ms']:8.2f}) "
            f"{row['tflops_per_gpu']:7.1f} TFLOPS/GPU  exchange {exchange_ms:8.2f} "
            f"(alone {out['exchange_alone_ms']:8.2f}) ms  exposed {exposed_ms:8.2f} ms "
            f"({100 * row['exposed_over_exchange_alone']:5.1f}% of alone)  "
            f"vs off {100 * row['slower_than_off']:+5.1f}%  err {err:.1e}"
        )
    moe.overlap = None
    return out


def targets(result: dict) -> dict:
    """The issue's targets against what has been measured so far."""
    rows = {f"layer/{n}": s["schedules"] for n, s in result["layer"].items()}
    rows |= {f"train/{n}": c["modes"] for n, c in result["train"].items()}
    fine = {
        f"{key}/{m}": r["exposed_over_exchange_alone"]
        for key, modes in rows.items()
        if key.split("/")[1] in FINE
        for m, r in modes.items()
    }
    slower = {
        f"{key}/{m}": r["slower_than_off"] for key, modes in rows.items() for m, r in modes.items()
    }
    return {
        "fine_grained_exposed_over_exchange_alone": fine,
        "fine_grained_meeting_10pct": sorted(k for k, v in fine.items() if v <= EXPOSED_TARGET),
        "slower_than_off_over_2pct": {k: v for k, v in slower.items() if v > SLOWER_TARGET},
        "off_exposed_share": {
            key: modes["off"]["exposed_ms"] / modes["off"]["median_ms"]
            for key, modes in rows.items()
            if "off" in modes
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="", help="JSON result file (rank 0 writes it)")
    ap.add_argument("--smoke", action="store_true", help="CPU/gloo with tiny shapes")
    ap.add_argument("--parts", default="layer,train", help="comma list of: layer, train")
    ap.add_argument("--tokens", type=int, default=0, help="layer: tokens per rank (32768)")
    ap.add_argument("--iters", type=int, default=0, help="layer: timed iterations (5)")
    ap.add_argument("--trace", default="", help="layer: directory for Chrome traces (off, all)")
    ap.add_argument("--train-configs", default=",".join(TRAIN_CONFIGS))
    ap.add_argument("--train-batch", type=int, default=0, help="sequences per rank (2)")
    ap.add_argument("--train-seq", type=int, default=0, help="tokens per sequence (4096)")
    ap.add_argument("--train-layers", type=int, default=0, help="override n_layers (0: config's)")
    ap.add_argument("--train-iters", type=int, default=0, help="timed steps per mode (5)")
    ap.add_argument(
        "--train-override",
        action="append",
        default=[],
        help="extra config override for every train config, e.g. --train-override=--moe.top_k=8",
    )
    ap.add_argument(
        "--high-priority",
        action="store_true",
        help="exchange.high_priority: the layer's EP group (all ranks) made with NCCL's "
        "high-priority stream (train: add --train-override=--exchange.high_priority=true)",
    )
    args = ap.parse_args()
    parts = args.parts.split(",")
    if unknown := set(parts) - {"layer", "train"}:
        raise SystemExit(f"--parts: unknown {sorted(unknown)}; expected layer and/or train")
    if args.smoke:
        dist.init_process_group("gloo")
        torch.set_num_threads(1)
        device, shapes, tokens, iters, tol, train_tol = (
            torch.device("cpu"),
            SMOKE_SHAPES,
            96,
            3,
            1e-5,
            1e-5,
        )
        amp = torch.autocast("cpu", enabled=False)
        defaults = (2, 16, 2)  # train: batch per rank, seq, iters
    else:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device)
        shapes, tokens, iters, tol, train_tol = SHAPES, 32768, 5, 3e-2, 5e-3
        amp = torch.autocast("cuda", dtype=torch.bfloat16)
        defaults = (2, 4096, 5)
    args.ep_group = dist.group.WORLD
    if args.high_priority:  # a group of all ranks (new_group is collective), with the options
        xcfg = ExchangeConfig(high_priority=True)
        args.ep_group = dist.new_group(pg_options=group_options(xcfg, dist.get_backend()))
    args.tokens, args.iters = args.tokens or tokens, args.iters or iters
    args.train_batch = args.train_batch or defaults[0]
    args.train_seq = args.train_seq or defaults[1]
    args.train_iters = args.train_iters or defaults[2]
    is_main = dist.get_rank() == 0
    t0 = time.perf_counter()

    def log(line: str) -> None:
        if is_main:
            print(line, flush=True)

    world = dist.get_world_size()
    result = {
        **environment(),
        # As launched: torchrun's workers see only `python script args`.
        "command": f"PYTHONPATH=src torchrun --standalone --nproc_per_node={world} "
        + " ".join(sys.argv),
        "nvlink_multicast_env": {
            k: os.environ[k]
            for k in (
                "NCCL_NVLS_ENABLE",
                "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                "NVSHMEM_DISABLE_NVLS",
            )
        },
        "world": world,
        "ep": world,
        "smoke": args.smoke,
        "high_priority": args.high_priority,  # the layer part's EP group (exchange.high_priority)
        "parts": parts,
        "complete": False,
        "layer": {},
        "train": {},
    }
    if device.type == "cuda":
        result["device"] = torch.cuda.get_device_name(device)

    def save() -> None:
        result["targets"] = targets(result)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        if is_main and args.out:
            write_result(args.out, result)

    if "layer" in parts:
        for name, shape in shapes.items():
            result["layer"][name] = bench_shape(
                name, shape, args.tokens, device, amp, args, tol, log
            )
            save()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if "train" in parts:
        for name in args.train_configs.split(","):

            def partial(out: dict, name=name) -> None:
                result["train"][name] = out
                save()

            bench_config(name, args, world, train_tol, log, partial)
    result["complete"] = True
    save()
    log(f"done in {result['seconds']} s" + (f"; wrote {args.out}" if args.out else ""))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
