"""The MoE layer under expert parallelism on one node: bf16 equivalence, then fwd+bwd speed.

    PYTHONPATH=src torchrun --nproc_per_node=4 benchmarks/moe_layer.py --out results.json
    PYTHONPATH=src torchrun --nproc_per_node=4 benchmarks/moe_layer.py --smoke   # CPU, gloo

Phases (every rank runs all of them; rank 0 writes the JSON):
  1. equivalence, for each of CASES (top-2; top-1 sigmoid; capacity drops; every token routed
     to rank 0, so the other ranks' experts get no rows): Braid's EP layer (ep = world, NCCL)
     against the same layer on one GPU. Each
     rank runs the single-GPU reference on its own tokens, so routing sees identical inputs;
     outputs and input grads are compared per rank, router/shared/expert grads after summing
     the reference's over ranks. Error = ||got - want|| / ||want|| (Frobenius); bf16 passes
     below 2e-2. The fraction of identical routing choices is reported too.
  2. speed, per shape (Mixtral-like 8x top-2, H 4096, F 14336; fine-grained 64x top-8, H 2048,
     F 1408), 32768 tokens per rank, bf16 weights and inputs, random router weights (logits of
     random inputs are i.i.d. over experts, so routing is balanced in expectation; the measured
     max/mean rows per rank is reported): median ms of forward+backward over ITERS after WARMUP
     (CUDA events, a barrier before each iteration, the slowest rank's median), TFLOPS per GPU
     = 3 passes x 2 x tokens x k x 3 GEMMs x H x F / time (expert GEMMs only, as Megatron
     counts), and the exchanges alone: the four all_to_all_single calls of one step (dispatch
     and combine, forward and backward) at the step's own splits.
NVLink multicast stays off (NCCL_NVLS_ENABLE=0 etc., set before any process group exists).
Runs on torch >= 2.11 from a checkout (PYTHONPATH=src), in well under three minutes.
"""

from __future__ import annotations

import os

for _k, _v in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ.setdefault(_k, _v)

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import environment, write_result  # noqa: E402
from torch import nn  # noqa: E402

from braid.config import load_config  # noqa: E402
from braid.model.config import ModelConfig  # noqa: E402
from braid.moe.config import MoEConfig  # noqa: E402
from braid.moe.layer import MoE  # noqa: E402
from braid.parallel.expert import apply_expert_parallel  # noqa: E402
from braid.parallel.mesh import ParallelContext  # noqa: E402

BF16_TOL = 2e-2
WARMUP, ITERS = 3, 20
SHAPES = {  # name: (experts, top_k, hidden H, expert FFN F, tokens per rank)
    "mixtral_8x_top2": (8, 2, 4096, 14336, 32768),
    "fine_64x_top8": (64, 8, 2048, 1408, 32768),
}
SMOKE_SHAPES = {"smoke_8x_top2": (8, 2, 64, 32, 256), "smoke_16x_top4": (16, 4, 32, 64, 128)}
CHECK = (8, 2, 1024, 2048, 4096)  # the equivalence shape on GPU
SMOKE_CHECK = (8, 2, 64, 32, 96)


def setup() -> ParallelContext:
    from torch.distributed.device_mesh import init_device_mesh

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (1, world), mesh_dim_names=("dp", "ep"))
    return ParallelContext(
        rank=dist.get_rank(),
        world=world,
        local_rank=local,
        device=device,
        ep=world,
        mesh=mesh,
        world_mesh=mesh["dp", "ep"]._flatten("world"),
    )


# Equivalence cases (MoEConfig overrides): plain top-2; top-1 with sigmoid scores; capacity
# drops; every token to rank 0's experts (aux-free bias forcing the choice), so the other ranks'
# experts receive no rows.
CASES = {
    "top2": {},
    "top1_sigmoid": {"top_k": 1, "score_func": "sigmoid"},
    "capacity": {"capacity_factor": 1.0},
    "all_to_rank0": {"bias_balance": True},
}


def build(
    shape: tuple,
    ctx: ParallelContext,
    dtype: torch.dtype,
    seed: int,
    keep_reference: bool,
    overrides: dict | None = None,
) -> tuple[nn.Module, nn.Module | None]:
    """(the EP layer, the whole single-GPU layer or None), same weights: seeded, per global id."""
    E, k, H, F, _ = shape
    mcfg = ModelConfig(dim=H)
    kw = {
        "num_experts": E,
        "top_k": k,
        "expert_hidden": F,
        "aux_loss_coef": 0.0,
        "z_loss_coef": 0.0,
        **(overrides or {}),
    }
    cfg = MoEConfig(**kw)
    with torch.device("meta"):
        layer = MoE(mcfg, cfg)
    ref = None
    if keep_reference:  # small shapes only: every expert on this GPU
        ref = copy.deepcopy(layer).to_empty(device=ctx.device).to(dtype)
        _init(ref, seed, offset=0)
    box = nn.ModuleDict({"moe": layer})
    apply_expert_parallel(box, load_config(None, []), ctx)
    box.to_empty(device=ctx.device)
    box.to(dtype)
    _init(layer, seed, offset=layer.experts.expert_offset)
    return layer, ref


@torch.no_grad()
def _init(layer: MoE, seed: int, offset: int) -> None:
    """Router ~ N(0, 1/H): i.i.d. logits over experts. Experts ~ N(0, 0.02), one seed each."""
    H = layer.router.weight.shape[1]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=gen) / H**0.5)
    layer.router.expert_bias.zero_()
    for name in ("w13", "w2"):
        w = getattr(layer.experts, name)
        w = w.to_local() if hasattr(w, "to_local") else w
        for e in range(w.shape[0]):
            g = torch.Generator(device="cpu").manual_seed(
                seed * 1000 + 7 * (offset + e) + len(name)
            )
            w[e].copy_(torch.randn(w.shape[1:], generator=g) * 0.02)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


def _sum(t: torch.Tensor) -> torch.Tensor:
    t = t.float().clone()
    dist.all_reduce(t)
    return t


def equivalence(ctx: ParallelContext, shape: tuple, dtype: torch.dtype) -> dict:
    """Every case of CASES at `shape`; passed when all pass."""
    cases = {name: equivalence_case(ctx, shape, dtype, kw) for name, kw in CASES.items()}
    return {"cases": cases, "passed": all(c["passed"] for c in cases.values())}


def equivalence_case(ctx: ParallelContext, shape: tuple, dtype: torch.dtype, kw: dict) -> dict:
    E, k, H, F, N = shape
    layer, ref = build(shape, ctx, dtype, seed=1, keep_reference=True, overrides=kw)
    if kw.get("bias_balance"):  # rank 0's experts win every choice; the rest get no rows
        L = E // ctx.world
        for m in (layer, ref):
            with torch.no_grad():
                m.router.expert_bias[:L] = 1e3
    gen = torch.Generator(device="cpu").manual_seed(100 + ctx.rank)  # this rank's tokens
    x = torch.randn(N, H, generator=gen).to(ctx.device, dtype)
    dy = torch.randn(N, H, generator=gen).to(ctx.device, dtype)
    results = {}
    for name, m in (("ep", layer), ("ref", ref)):
        xi = x.clone().requires_grad_(True)
        out, _ = m(xi[None])
        out.backward(dy[None])
        with torch.no_grad():
            idx = m.router(xi.detach(), lambda t: t).topk_idx_NK
        results[name] = (out[0].detach(), xi.grad, idx)
    lo, L = layer.experts.expert_offset, layer.experts.num_experts
    err = {
        "out": _rel(results["ep"][0], results["ref"][0]),
        "x_grad": _rel(results["ep"][1], results["ref"][1]),
        "router_grad": _rel(_sum(layer.router.weight.grad), _sum(ref.router.weight.grad)),
    }
    for name in ("w13", "w2"):
        got = getattr(layer.experts, name).grad.to_local()
        want = _sum(getattr(ref.experts, name).grad)[lo : lo + L]
        err[f"experts.{name}_grad"] = _rel(got, want)
    worst = {key: max(v) for key, v in _gather(err).items()}
    same = _sum((results["ep"][2] == results["ref"][2]).all(-1).float().mean()) / ctx.world
    return {
        "shape": dict(
            zip(("experts", "top_k", "hidden", "ffn", "tokens_per_rank"), shape, strict=True)
        ),
        "overrides": kw,
        "dtype": str(dtype),
        "tolerance": BF16_TOL,
        "rel_err": worst,
        "routing_identical": round(float(same), 6),
        "passed": all(v < BF16_TOL for v in worst.values()),
    }


def _gather(d: dict) -> dict:
    box: list = [None] * dist.get_world_size()
    dist.all_gather_object(box, d)
    return {key: [b[key] for b in box] for key in d}


def _timed(fn, ctx: ParallelContext, iters: int, warmup: int) -> list[float]:
    """Per-iteration ms, each started after a barrier (CUDA events, or perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    cuda = ctx.device.type == "cuda"
    for _ in range(iters):
        dist.barrier()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    return times


def speed(
    ctx: ParallelContext, name: str, shape: tuple, dtype: torch.dtype, iters: int, warmup: int
) -> dict:
    E, k, H, F, N = shape
    layer, _ = build(shape, ctx, dtype, seed=2, keep_reference=False)
    gen = torch.Generator(device="cpu").manual_seed(200 + ctx.rank)
    x = torch.randn(N, H, generator=gen).to(ctx.device, dtype).requires_grad_(True)
    dy = torch.randn(N, H, generator=gen).to(ctx.device, dtype)

    def step():
        out, _ = layer(x[None])
        out.backward(dy[None])
        x.grad = None
        for p in layer.parameters():
            p.grad = None

    layer_ms = _timed(step, ctx, iters, warmup)
    # The same step's exchanges alone: its splits, its row width and dtype.
    with torch.no_grad():
        r = layer.router(x.detach(), layer.dispatcher.exchange.all_reduce_sum)
        (route,) = layer.dispatcher.plan(r.topk_idx_NK).routes
    ex = layer.dispatcher.exchange
    send, recv = route.send, route.recv
    rows_out, rows_in = x.new_empty(sum(send), H), x.new_empty(sum(recv), H)

    def exchanges():  # dispatch, combine (forward); their reverses (backward)
        for a, s, rsp in (
            (rows_out, send, recv),
            (rows_in, recv, send),
            (rows_out, send, recv),
            (rows_in, recv, send),
        ):
            ex.move(a, s, rsp).wait()

    a2a_ms = _timed(exchanges, ctx, iters, warmup)
    ranks = _gather(
        {
            "med": statistics.median(layer_ms),
            "min": min(layer_ms),
            "max": max(layer_ms),
            "a2a": statistics.median(a2a_ms),
            "rows": sum(recv),
        }
    )
    med, a2a, rows = max(ranks["med"]), max(ranks["a2a"]), ranks["rows"]  # the slowest rank
    flops = 3 * 2 * N * k * 3 * H * F
    return {
        "name": name,
        "experts": E,
        "top_k": k,
        "hidden": H,
        "ffn": F,
        "tokens_per_rank": N,
        "ep": ctx.world,
        "dtype": str(dtype),
        "iters": iters,
        "median_ms": round(med, 3),
        "min_ms": round(min(ranks["min"]), 3),
        "max_ms": round(max(ranks["max"]), 3),
        "tflops_per_gpu": round(flops / (med / 1e3) / 1e12, 2),
        "exchange_ms": round(a2a, 3),
        "exchange_share": round(a2a / med, 3),
        "rows_per_rank_max_over_mean": round(max(rows) / statistics.mean(rows), 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="JSON result path (rank 0 writes it)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU with gloo")
    p.add_argument("--iters", type=int, default=ITERS)
    args = p.parse_args()
    ctx = setup()
    smoke = args.smoke or ctx.device.type != "cuda"
    dtype = torch.bfloat16
    result = {**environment(), "world": ctx.world, "smoke": smoke}
    # As launched: torchrun's workers see only `python script args`.
    result["command"] = f"PYTHONPATH=src torchrun --nproc_per_node={ctx.world} " + " ".join(
        sys.argv
    )
    if ctx.device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(ctx.device)
    t0 = time.perf_counter()
    result["equivalence"] = equivalence(ctx, SMOKE_CHECK if smoke else CHECK, dtype)
    if ctx.is_main:
        print("equivalence", result["equivalence"], flush=True)
    result["layers"] = []
    iters, warmup = (3, 1) if smoke else (args.iters, WARMUP)
    for name, shape in (SMOKE_SHAPES if smoke else SHAPES).items():
        r = speed(ctx, name, shape, dtype, iters, warmup)
        result["layers"].append(r)
        if ctx.is_main:
            print(r, flush=True)
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if ctx.is_main and args.out:
        write_result(args.out, result)
    dist.barrier()
    dist.destroy_process_group()
    if not result["equivalence"]["passed"]:
        sys.exit(f"equivalence failed: {result['equivalence']['cases']} (tolerance {BF16_TOL})")


if __name__ == "__main__":
    main()
