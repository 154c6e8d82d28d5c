"""The training-step part of benchmarks/overlap_sim.py: forward + backward + AdamW step of a
config with every MoE layer's exchange simulated, in every overlap mode (see overlap_sim.py).
"""

from __future__ import annotations

import gc
import statistics
from typing import Any

import torch
from common import time_cuda
from overlap_exchange import record
from overlap_modes import MODES, profile_step, row_of, runnable, summarize, time_alone, trace
from overlap_train_step import SMOKE_SIZE  # the same tiny sizes as the multi-GPU benchmark

from braid.config import load_config
from braid.info import arithmetic
from braid.overlap.dense import restore_dense
from braid.overlap.engine import LayerOverlap
from braid.overlap.session import OverlapSession
from braid.overlap.streams import Clock, synchronize
from braid.parallel.clip import clip_grad_norm
from braid.parallel.distributed import init_parallel
from braid.train.loss import autocast, loss_fn
from braid.train.model_setup import build_model
from braid.train.optim import build_optimizer, lr_at

TRAIN_MODES = {  # the layer part's A/B of chunk_dw is left to it
    **{mode: sched for mode, sched in MODES.items() if not mode.endswith("_per_chunk")},
    "split_all": (1, "all"),
    "chunks2_all": (2, "all"),
    "chunks4_all": (4, "all"),
    "chunks8_all": (8, "all"),
    "auto_all": ("auto", "all"),
}


def _profiled(p: dict) -> str:
    return (
        f"  | profiled: wall {p['wall_ms']:.1f} host {p['host_ms']:.1f}"
        f" kernels {p['kernel_ms']:.1f} busy {p['busy_ms']:.1f} idle {p['idle_ms']:.1f} ms"
    )


def train_overrides(name: str, args, mode: tuple | None) -> list[str]:
    over = [
        "--parallel.ep=1",  # one process: all experts here, the exchange simulated
        "--exchange.algorithm=simulated",
        f"--exchange.simulate_ranks={args.ranks}",
        f"--train.batch_size={args.train_batch}",
        f"--train.seq_len={args.train_seq}",
        "--train.grad_accum=1",
    ]
    if args.smoke:
        over = SMOKE_SIZE + over + ["--train.device=cpu"]
    if args.train_layers:
        over.append(f"--model.n_layers={args.train_layers}")
    if mode is not None:
        C, split, *dw = mode
        over += [f'--overlap.chunks="{C}"' if C == "auto" else f"--overlap.chunks={C}"]
        split_mode = {False: "off", True: "experts"}.get(split, split)
        over += [f"--overlap.split_dw={split_mode}", f"--overlap.chunk_by={args.chunk_by}"]
        over += [f"--overlap.trial_steps={args.trial_steps}"]
        over += [f"--overlap.chunk_dw={dw[0] if dw else args.chunk_dw}"]
    return over


def _check_train(name: str, mode: str, step, out: dict, exchange, device, args) -> None:
    """Two steps of `mode` from the saved weights: their losses must be off's (off records
    them, and its exchanges for the replay alone). The losses go to `out["_losses"]`."""
    if mode == "off":
        with record(exchange) as calls:
            first = float(step())
    else:
        first = float(step())
    losses = [first, float(step())]
    if mode == "off":
        out["reference_losses"] = losses
        out["exchange_alone_ms"] = time_alone(exchange, calls, device, max(args.iters, 3))
        out["exchange_alone_movements"] = len(calls)
    ref = out["reference_losses"]
    err = max(abs(p - q) / abs(q) for p, q in zip(losses, ref, strict=True))
    if err > args.train_tol:
        raise SystemExit(f"train {name}/{mode}: losses {losses} != off's {ref}")
    out["_losses"] = losses


def bench_train(name: str, args, log) -> dict:
    cfg = load_config(name, train_overrides(name, args, None))
    ctx = init_parallel(cfg)
    device = ctx.device
    if device.type == "cuda":  # max_mem_gib: this config's peak, not an earlier config's
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(cfg, ctx)
    saved = [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]
    moes = model.moe_modules()
    exchange = next(iter(moes.values())).dispatcher.exchange
    gen = torch.Generator().manual_seed(1000)
    x = torch.randint(
        0, cfg.model.vocab_size, (args.train_batch, args.train_seq + 1), generator=gen
    )
    x = x.to(device)
    amp = autocast(cfg, device)
    dtype = torch.bfloat16 if isinstance(amp, torch.autocast) else torch.float32
    a = arithmetic(cfg, args.train_seq)
    out: dict[str, Any] = {
        "config": name,
        "n_layers": cfg.model.n_layers,
        "layers_override": bool(args.train_layers),
        "moe_layers": len(moes),
        "experts": cfg.moe.num_experts,
        "top_k": cfg.moe.top_k,
        "shared_experts": cfg.moe.num_shared_experts,
        "tokens_per_step": args.train_batch * args.train_seq,
        "total_params": a.total_params,
        "compute_dtype": str(dtype),
        "modes": {},
    }
    local = next(iter(moes.values())).dispatcher.chunk_local  # experts per simulated rank
    modes = runnable(TRAIN_MODES, args.chunk_by, local, out)
    times: dict[str, list[dict]] = {m: [] for m in modes}
    for rnd in range(args.rounds):  # every mode once per round (see the layer part)
        for mode, sched in modes.items():
            with torch.no_grad():
                params = list(model.parameters()) + list(model.buffers())
                for t, s in zip(params, saved, strict=True):
                    t.copy_(s)
            for moe in moes.values():
                moe.overlap = None
            mcfg = load_config(name, train_overrides(name, args, sched))
            session = OverlapSession.install(
                model,
                mcfg.overlap,
                device=device,
                tokens_per_rank=args.train_batch * args.train_seq,
                dtype=dtype,
                log=lambda line: None,
            )
            opt = build_optimizer(model, mcfg.train, device)
            for grp in opt.param_groups:
                grp["lr"] = mcfg.train.lr

            def step(opt=opt, session=session, mcfg=mcfg):
                loss, parts = loss_fn(model, x[:, :-1], x[:, 1:], mcfg, amp)
                loss.backward()
                session.flush()
                clip_grad_norm(model, mcfg.train.grad_clip, ctx)
                opt.step()
                opt.zero_grad(set_to_none=True)
                model.update_router_biases()
                return parts["ce"]

            if rnd == 0:
                _check_train(name, mode, step, out, exchange, device, args)
            for k in range(session.trial_steps_left):  # chunks="auto": the chunk trial
                session.begin_step(k + 1)
                step()
                session.end_step(k + 1)
            for grp in opt.param_groups:
                grp["lr"] = lr_at(0, mcfg.train)
            times[mode].append(time_cuda(step, iters=args.train_iters, warmup=1))
            if rnd == 0:
                tl = timeline_step(model, step, device)
                chunks = sorted({lo.chunks for lo in session.layers.values()}) or [1]
                split = mcfg.overlap.split_dw
                row = row_of(
                    times[mode][0], tl, out["exchange_alone_ms"], None, chunks=chunks,
                    split_dw=split, losses=out.pop("_losses"),
                )  # fmt: skip
                # What the chunks hold, per MoE layer: "experts" or "tokens" (chunk_local).
                row["chunk_axes"] = sorted(
                    {
                        lo.chunking(moes[i].dispatcher.chunk_local)[1]
                        for i, lo in session.layers.items()
                    }
                ) or ["tokens"]
                row["chunk_dw"] = sorted(
                    {str(lo.routed_dw()) for lo in session.layers.values() if lo.joined}
                )  # chunks of tokens with split_dw: "joined" or "per_chunk" ("None": fp8)
                if split == "all":  # the blocks above each MoE layer: dW drained, flushed
                    row["dense_dW_ms"] = tl["dense_dW_ms"]
                    row["dense_dW_flush_ms"] = tl["dense_dW_flush_ms"]
                    # Counts over every step this mode ran (checks, warm-up and timed steps).
                    layers = session.layers.values()
                    row["dense_dW_tasks"] = sum(lo.dense.num_run for lo in layers)
                    row["dense_dW_tasks_in_windows"] = sum(lo.dense.num_drained for lo in layers)
                if args.profile:
                    row["profile"] = profile_step(step, device)
                out["modes"][mode] = row
                traced = args.traced or not args.trace or args.only_layer_trace
                if mode == args.trace_mode and not traced:
                    trace(step, device, args.trace)
                    out["trace"] = {"path": args.trace, "mode": mode, "chunks": chunks}
                    args.traced = True
            del opt, session, step
            gc.collect()
            if device.type == "cuda":
                out["max_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                torch.cuda.empty_cache()
    off_ms = statistics.median(r["median_ms"] for r in times["off"])
    for mode, row in out["modes"].items():
        rounds = times[mode]
        row["median_ms"] = statistics.median(r["median_ms"] for r in rounds)
        row["min_ms"] = min(r["min_ms"] for r in rounds)
        row["max_ms"] = max(r["max_ms"] for r in rounds)
        row["round_medians_ms"] = [r["median_ms"] for r in rounds]
        row["slower_than_off"] = row["median_ms"] / off_ms - 1
        log(
            f"train {name:>8} {mode:>13}: C={row['chunks']!s:>6} {row['median_ms']:9.2f} ms  "
            f"exchange {row['exchange_ms']:7.2f} (alone {out['exchange_alone_ms']:7.2f}) exposed "
            f"{row['exposed_ms']:7.2f} ({100 * row['exposed_over_exchange_alone']:5.1f}%)  "
            f"vs off {100 * row['slower_than_off']:+5.1f}%"
            + (_profiled(row["profile"]) if "profile" in row else "")
        )
    for moe in moes.values():
        moe.overlap = None
    restore_dense(model)
    out.update(summarize(out["modes"]))
    return out


def timeline_step(model, step, device) -> dict[str, float]:
    """One step with every MoE layer's timeline on (off: the C=1 twin); sums over layers."""
    moes, twins = model.moe_modules(), set()
    for i, moe in moes.items():
        if moe.overlap is None:
            moe.overlap = LayerOverlap(i, 1, False, Clock(device))
            twins.add(i)
        moe.overlap.timeline.timing = True
    step()
    synchronize(device)
    rows = [moe.overlap.timeline.summary() for moe in moes.values()]
    for i, moe in moes.items():
        moe.overlap.timeline.timing = False
        if i in twins:
            moe.overlap = None
    keys = ("exchange_ms", "exposed_ms", "dW_ms", "measured_ms")
    keys += ("dense_dW_ms", "dense_dW_flush_ms")  # split_dw = "all"
    return {k: sum(r.get(k, 0.0) for r in rows) for k in keys}
