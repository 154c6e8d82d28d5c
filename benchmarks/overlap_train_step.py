"""The training-step part of benchmarks/overlap_bench.py: a whole model, one optimizer step.

Job: for a config (medium: 7.4B, 8 experts top-2; moonlet: 7.3B, 64 experts top-6 + 2 shared)
at ep = world (dp = 1), time forward + backward + optimizer step of the real model, built by
the trainer's own pieces (build_model -> OverlapSession.install -> loss_fn -> backward ->
overlap.flush -> clip_grad_norm -> AdamW.step -> update_router_biases), under several overlap
modes, and report how much of its exchange stays exposed.

Per config (`bench_config`):
  1. build the model once, keep a copy of this rank's weights and buffers, turn on NCCL's
     collective timing (every mode is timed under the same conditions);
  2. per mode: restore the weights, a fresh AdamW, install the mode's overlap engine; two
     optimizer steps on a fixed batch, whose global-mean losses must equal off's (the first
     checks the forward, the second the gradients through one AdamW step); one warm-up step,
     ITERS timed steps (CUDA events, the slowest rank's median), then one step with the
     overlap timeline on (for off: the C=1 engine, which runs the plain path's order): exchange
     and exposed ms summed over the MoE layers;
  3. the exchange alone: every movement of off's first step, replayed by itself
     (benchmarks/overlap_exchange.py).
Tokens/s count the global batch; TFLOPS per GPU use training FLOPs per token from
`braid.info.arithmetic` (6 x active GEMM parameters + causal attention).
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import time_cuda  # noqa: E402
from overlap_exchange import record, slowest, time_alone  # noqa: E402

from braid.config import Config, load_config  # noqa: E402
from braid.info import arithmetic  # noqa: E402
from braid.overlap.engine import LayerOverlap  # noqa: E402
from braid.overlap.session import OverlapSession  # noqa: E402
from braid.overlap.streams import Clock, synchronize  # noqa: E402
from braid.parallel.clip import clip_grad_norm  # noqa: E402
from braid.parallel.distributed import all_reduce_mean, init_distributed  # noqa: E402
from braid.parallel.mesh import ParallelContext  # noqa: E402
from braid.train.loss import autocast, loss_fn  # noqa: E402
from braid.train.model_setup import build_model  # noqa: E402
from braid.train.optim import build_optimizer, lr_at  # noqa: E402

PEAK = 989e12  # H100/H200 dense bf16 datasheet peak, as benchmarks/model_step.py
TRAIN_CONFIGS = ("medium", "moonlet")
TRAIN_MODES = {  # name: overlap overrides
    "off": [],
    "split_dw": ["--overlap.split_dw=true"],
    "chunks2": ["--overlap.chunks=2"],
    "all": ['--overlap.chunks="auto"', "--overlap.split_dw=true"],
}
SMOKE_SIZE = [  # the configs' structure (dense first layers, shared experts, E, k), tiny sizes
    "--model.dim=32",
    "--model.n_layers=3",
    "--model.n_heads=2",
    "--model.vocab_size=128",
    "--model.ffn_hidden=64",
    "--model.max_seq_len=32",
    "--moe.expert_hidden=16",
]


def load(name: str, args: Any, world: int, mode: list) -> Config:
    batch, seq, layers, smoke, extra = (
        args.train_batch,
        args.train_seq,
        args.train_layers,
        args.smoke,
        args.train_override,
    )
    over = [
        f"--parallel.ep={world}",
        f"--train.batch_size={batch * world}",
        f"--train.seq_len={seq}",
        "--train.grad_accum=1",
    ]
    if smoke:
        over = SMOKE_SIZE + over
    if layers:
        over.append(f"--model.n_layers={layers}")
    return load_config(name, over + list(extra) + mode)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # DTensor (FSDP2, EP): this rank's part


def _state(model) -> list[torch.Tensor]:
    return [_local(t) for t in list(model.parameters()) + list(model.buffers())]


class Step:
    """One optimizer step of `model` on a fixed batch (the trainer's sequence, no data loader)."""

    def __init__(self, model, cfg: Config, ctx: ParallelContext, session: OverlapSession, x):
        self.model, self.cfg, self.ctx, self.session, self.x = model, cfg, ctx, session, x
        self.opt = build_optimizer(model, cfg.train, ctx.device)
        self.amp = autocast(cfg, ctx.device)
        self.set_lr(cfg.train.lr)

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr

    def __call__(self) -> torch.Tensor:
        x, cfg = self.x, self.cfg
        loss, parts = loss_fn(self.model, x[:, :-1], x[:, 1:], cfg, self.amp)
        loss.backward()
        self.session.flush()  # every deferred weight grad lands before the norm and the step
        clip_grad_norm(self.model, cfg.train.grad_clip, self.ctx)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.model.update_router_biases()
        return parts["ce"]


def timeline_step(model, step: Step, device: torch.device) -> dict[str, Any]:
    """One step with every MoE layer's timeline on; exchange and exposed ms summed over layers."""
    moes = model.moe_modules()
    twins = {}  # off: the C=1 engine times the plain path's order
    for i, moe in moes.items():
        if moe.overlap is None:
            twins[i] = moe.overlap = LayerOverlap(i, 1, False, Clock(device))
    for moe in moes.values():
        moe.overlap.timeline.timing = True
    step()
    synchronize(device)
    rows = {i: moe.overlap.timeline.summary() for i, moe in moes.items()}
    for i, moe in moes.items():
        moe.overlap.timeline.timing = False
        if i in twins:
            moe.overlap = None
    return {
        "exchange_ms": sum(r["exchange_ms"] for r in rows.values()),
        "exposed_ms": sum(r["exposed_ms"] for r in rows.values()),
        "moe_measured_ms": sum(r["measured_ms"] for r in rows.values()),
        "dW_ms": sum(r.get("dW_ms", 0.0) + r.get("dW_flush_ms", 0.0) for r in rows.values()),
    }


def bench_config(
    name: str,
    args: Any,
    world: int,
    tol: float,
    log,
    on_mode,
) -> dict[str, Any]:
    """All modes of one config; `on_mode(partial_result)` after each (incremental JSON)."""
    batch, seq, iters = args.train_batch, args.train_seq, args.train_iters
    cfg = load(name, args, world, [])
    ctx = init_distributed(cfg)
    device = ctx.device
    if device.type == "cuda":  # max_mem_gib: this config's peak, not an earlier config's
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(cfg, ctx)
    saved = [t.detach().clone() for t in _state(model)]
    moes = model.moe_modules()
    exchange = next(iter(moes.values())).dispatcher.exchange
    exchange.enable_timing()
    gen = torch.Generator().manual_seed(1000 + ctx.rank)  # this rank's fixed batch
    x = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1), generator=gen).to(device)
    a = arithmetic(cfg, seq)
    tokens = batch * seq * world  # the global batch of one step
    dtype = torch.bfloat16 if isinstance(autocast(cfg, device), torch.autocast) else torch.float32
    m = cfg.model
    out: dict[str, Any] = {
        "config": name,
        "n_layers": m.n_layers,
        "layers_override": bool(args.train_layers),
        "overrides": list(args.train_override),
        "moe_layers": len(moes),
        "dim": m.dim,
        "experts": cfg.moe.num_experts,
        "top_k": cfg.moe.top_k,
        "shared_experts": cfg.moe.num_shared_experts,
        "expert_hidden": cfg.moe.expert_hidden,
        "ep": ctx.ep,
        "dp": world // ctx.ep,
        "batch_per_rank": batch,
        "seq_len": seq,
        "tokens_per_step": tokens,
        "total_params": a.total_params,
        "active_params": a.active_params,
        "flops_per_token": a.flops_per_token,
        "compute_dtype": str(dtype),
        "iters": iters,
        "modes": {},
    }
    for mode, overrides in TRAIN_MODES.items():
        with torch.no_grad():
            for t, s in zip(_state(model), saved, strict=True):
                t.copy_(s)
        for moe in moes.values():
            moe.overlap = None
        mcfg = load(name, args, world, overrides)
        session = OverlapSession.install(
            model,
            mcfg.overlap,
            device=device,
            tokens_per_rank=batch * seq,
            dtype=dtype,
            is_main=ctx.is_main,
            log=log,
        )
        step = Step(model, mcfg, ctx, session, x)  # the peak lr: step 2's loss sees step 1's grads
        if mode == "off":
            with record(exchange) as calls:
                first = all_reduce_mean(step(), ctx)
        else:
            first = all_reduce_mean(step(), ctx)
        losses = [float(first), float(all_reduce_mean(step(), ctx))]
        if mode == "off":
            out["reference_losses"] = losses
            out.update(time_alone(exchange, calls, device, max(iters, 3)))
        ref = out["reference_losses"]
        err = max(abs(a_ - r) / abs(r) for a_, r in zip(losses, ref, strict=True))
        if err > tol:
            raise SystemExit(f"train {name}/{mode}: losses {losses} != off's {ref} (tol {tol})")
        # Timed at the schedule's first lr (lr / warmup): the peak lr without warm-up, kept for
        # ITERS more steps, could diverge, and NaN logits would change the routing.
        step.set_lr(lr_at(0, mcfg.train))
        t = time_cuda(step, iters=iters, warmup=1)
        tl = timeline_step(model, step, device)
        med = slowest(t["median_ms"], device)
        tps = tokens / (med / 1e3)
        row = {
            "chunks": sorted({lo.chunks for lo in session.layers.values()}) or [1],
            "split_dw": mcfg.overlap.split_dw,
            "expert_dw_deferred": any(lo.defer_expert_dw for lo in session.layers.values()),
            "losses": losses,
            "rel_err_vs_off": err,
            "median_ms": med,
            "min_ms": t["min_ms"],
            "max_ms": t["max_ms"],
            "tokens_per_s": tps,
            "tflops_per_gpu": tps / world * a.flops_per_token / 1e12,
            "mfu_vs_989": tps / world * a.flops_per_token / PEAK,
            **{k: slowest(v, device) for k, v in tl.items()},
        }
        row["exposed_fraction"] = row["exposed_ms"] / max(row["exchange_ms"], 1e-9)
        row["exposed_over_exchange_alone"] = row["exposed_ms"] / max(out["exchange_alone_ms"], 1e-9)
        row["slower_than_off"] = med / out["modes"]["off"]["median_ms"] - 1 if out["modes"] else 0.0
        out["modes"][mode] = row
        log(
            f"train {name:>8} {mode:>9}: C={row['chunks']!s:>6} {med:9.2f} ms "
            f"{tps:10.0f} tok/s {row['tflops_per_gpu']:7.1f} TFLOPS/GPU  "
            f"exchange {row['exchange_ms']:8.2f} (alone {out['exchange_alone_ms']:8.2f}) ms "
            f"exposed {row['exposed_ms']:8.2f} ms "
            f"({100 * row['exposed_over_exchange_alone']:5.1f}% of alone)  "
            f"vs off {100 * row['slower_than_off']:+5.1f}%  err {err:.1e}"
        )
        del step, session
        gc.collect()
        if device.type == "cuda":
            out["max_mem_gib"] = slowest(torch.cuda.max_memory_allocated(device) / 2**30, device)
            torch.cuda.empty_cache()
        on_mode(out)
    for moe in moes.values():
        moe.overlap = None
    del model, saved
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    dist.barrier()
    return out
