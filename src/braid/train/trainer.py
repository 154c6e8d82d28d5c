"""The training loop: data -> model -> loss -> backward -> clip -> step, with logging around it.

Phases of `train(cfg)`:
  1. layout: one process, or the torchrun group (braid.parallel); the run directory and records;
  2. data: the shards named by data.path, or the built-in corpus prepared on first use;
  3. model: built on the meta device, parallelized, materialised with `to_empty`, then
     initialised layout-independently (braid.model.init) — or restored from a checkpoint;
  4. loop: grad-accumulated micro-steps (with train.cast_weights_once on bf16 copies of the
     weights cast once per step, train/weight_cast.py), clip, AdamW, router bias update,
     log/validate/checkpoint;
     in one process with a fused optimizer (CUDA) the step never waits for the host: non-finite
     steps are masked on the device (train/step.py) and the host reads the loss, grad norm and
     skip count only at log, validation and checkpoint steps; otherwise (several processes, or
     CPU's foreach AdamW) the host gate reads them every step;
  5. end: final validation, a checkpoint, summary.json, and one JSON line on stdout (last line).
SIGTERM (what schedulers send) or Ctrl-C (SIGINT) ends the loop after the current step, on every
rank alike: metrics flushed, a checkpoint of that step, the run marked killed, then `Stopped`
(exit code 143 for SIGTERM, 130 for Ctrl-C); a second signal interrupts at once. A metrics file
that cannot be written stops the run the same way with a one-line error (metrics.on_error).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from braid.config import Config
from braid.errors import BraidError, StorageError
from braid.info import arithmetic
from braid.overlap.session import OverlapSession
from braid.parallel.distributed import init_parallel
from braid.parallel.mesh import ParallelContext
from braid.train.log import TrainLogger, check_logging
from braid.train.loss import autocast, compute_dtype, evaluate, loss_fn, stream_dtype
from braid.train.model_setup import build_model, load_data
from braid.train.optim import build_optimizer, lr_at
from braid.train.result import json_safe
from braid.train.rundir import (
    discard_new_run_dir,
    new_run_id,
    open_run_dir,
    write_json_atomic,
    write_run_files,
)
from braid.train.runlock import RunLock
from braid.train.signals import StopOnSignal, Stopped
from braid.train.step import DeviceGate, supports_device_gate
from braid.train.weight_cast import check_cast, step_cast


@dataclass
class TrainState:
    """Everything besides model and optimizer that a checkpoint must restore exactly."""

    step: int = 0
    skipped_steps: int = 0
    tokens_seen: int = 0
    initial_val_loss: float | None = None
    extra: dict = field(default_factory=dict)


def nonfinite_culprit(model) -> str:
    """Name of the first parameter whose gradient is not finite (only called on failure)."""
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return name
    return "unknown"


def train(cfg: Config, *, overrides: list[str] | None = None) -> dict:
    ctx = init_parallel(cfg)
    from braid.parallel.distributed import shutdown

    try:
        return _train(cfg, ctx)
    finally:
        shutdown(ctx)  # ends the process group only if init_parallel started it


def _train(cfg: Config, ctx: ParallelContext) -> dict:
    torch.manual_seed(cfg.train.seed)
    from braid.parallel.distributed import broadcast_object, raise_on_any

    # Dependencies, data and model first: a bad corpus or config fails before anything is written.
    check_logging(cfg)
    check_cast(cfg.train.cast_weights_once, compute_dtype(cfg, ctx.device), ctx.world)
    run_id = broadcast_object(new_run_id(cfg), ctx)
    lock = RunLock(Path(cfg.run.dir) / run_id)  # one writer per run; rank 0 holds it for all
    # Another job training this run: refused before data and model are built.
    raise_on_any(lock.busy() if ctx.is_main else None, ctx)
    train_ds, val_ds, loader, val_batches = load_data(cfg, ctx)
    init_from = cfg.checkpoint.init_from
    if init_from:
        from braid.checkpoint.init_from import check_init

        check_init(cfg, train_ds.tokenizer_path)
    model = build_model(cfg, ctx, init=not init_from)  # init_from/resume fill it below
    made: tuple[Path | None, bool, str | None] = (None, False, None)
    if ctx.is_main:
        try:
            made = (*open_run_dir(cfg, run_id, lock), None)
            print(f"run {run_id}: {made[0]}", file=sys.stderr, flush=True)
        except BraidError as e:
            made = (None, False, str(e))
    run_dir, created, why = broadcast_object(made, ctx)
    if why is not None:
        raise BraidError(why)  # on every rank alike, so none waits in a collective
    started = [False]  # set once the run's files are written
    try:
        return _run(cfg, ctx, run_id, run_dir, loader, val_batches, model, train_ds, started)
    finally:
        if ctx.is_main and not started[0]:  # refused before it began: leave no empty run
            discard_new_run_dir(run_dir, created)  # under the lock: no one else is in it
        lock.release()


def _run(cfg, ctx, run_id, run_dir, loader, val_batches, model, train_ds, started) -> dict:
    """Phases 3-5 inside the run directory, which this process (or its rank 0) has locked. The
    config and tokenizer are written into it only after the resume and `init_from` were
    accepted, so a refused run leaves an existing run's files as they were."""
    opt = build_optimizer(model, cfg.train, ctx.device)
    amp = autocast(cfg, ctx.device)
    compute = compute_dtype(cfg, ctx.device)
    # Overlap engine on each MoE layer (after parallelize: the EP exchange is in place); with
    # overlap.chunks="auto" this times exchanges and GEMMs on every rank and logs the plan.
    tc = cfg.train
    overlap = OverlapSession.install(
        model,
        cfg.overlap,
        device=ctx.device,
        log_every=tc.log_every,
        dtype=compute,
        stream=stream_dtype(cfg, ctx.device, ctx.distributed),
        tokens_per_rank=tc.batch_size // tc.grad_accum * tc.seq_len // ctx.world,
        is_main=ctx.is_main,
        run_dir=run_dir,
        rank=ctx.rank,
    )
    state = TrainState()

    from braid.checkpoint.manager import Checkpointer

    ckpt = Checkpointer(run_dir, cfg, ctx)
    ckpt.resume(model, opt, loader, state)
    init_from = cfg.checkpoint.init_from
    if init_from and state.step == 0:  # a new run (resume found nothing): start from weights
        from braid.checkpoint.init_from import load_init

        load_init(model, init_from, cfg)
    from braid.parallel.distributed import raise_on_any

    why = None
    if ctx.is_main:
        try:
            write_run_files(cfg, run_dir, train_ds.tokenizer_path)
        except BraidError as e:
            why = e
    raise_on_any(why, ctx)  # on every rank alike
    started[0] = True
    cast = step_cast(  # after the weights
        model, cfg.train.cast_weights_once, compute, ctx.world, cfg.train.grad_accum
    )
    log = TrainLogger(cfg, ctx, run_id, run_dir, arithmetic(cfg).flops_per_token)
    from braid.parallel.expert import watch_exchange_choice  # exchange.algorithm=auto: record

    watch_exchange_choice(model, lambda choice: log.writer.log(state.step, choice.metrics()))
    with StopOnSignal() as sigterm:
        try:
            result = _loop(
                cfg,
                ctx,
                model,
                opt,
                loader,
                val_batches,
                amp,
                state,
                ckpt,
                log,
                overlap,
                sigterm,
                cast,
            )
        except BaseException as e:
            killed = isinstance(e, (KeyboardInterrupt, Stopped))
            log.close(status="killed" if killed else "failed", step=state.step, error=str(e))
            raise
    result.update(run_id=run_id, run_dir=str(run_dir))
    if ctx.is_main:
        try:
            write_json_atomic(run_dir / "summary.json", json_safe(result))
        except OSError as e:  # the run is done and checkpointed; its registry row says why
            err = StorageError(e, run_dir / "summary.json", "write")
            log.close(status="failed", step=state.step, error=str(err))
            raise err from None
    log.close(status="finished", step=result["steps"], last_loss=result["final_train_loss"])
    return {**result, "rank": ctx.rank}  # the CLI prints the result of rank 0 only


def _loop(
    cfg, ctx, model, opt, loader, val_batches, amp, state, ckpt, log, overlap, sigterm, cast
) -> dict:
    tc = cfg.train

    def weights():  # train.cast_weights_once: the micro-steps run on bf16 copies cast once
        return cast.swapped() if cast is not None else contextlib.nullcontext()

    def validate() -> float | None:
        with weights():
            return evaluate(model, val_batches, cfg, amp, ctx)

    micro_tokens = tc.batch_size // tc.grad_accum * tc.seq_len  # global tokens per micro-step
    if state.step == 0:
        state.initial_val_loss = validate()
        log.val(state.step, state.initial_val_loss)
    model.train()
    train_loss = state.extra.get("train_loss", float("nan"))  # restored by a resume
    t_last, tokens_last = time.perf_counter(), state.tokens_seen
    stop = min(tc.stop_at or tc.steps, tc.steps)
    # One process with a fused optimizer: no host sync between logging steps (train/step.py).
    gate = None
    if not ctx.distributed and supports_device_gate(opt):
        gate = DeviceGate(ctx.device, skip_nonfinite=tc.skip_nonfinite, loss=train_loss)
    skipped_before, gn_val = state.skipped_steps, float("nan")
    fp8_stats = getattr(model, "fp8_stats", None)  # train.precision=fp8 (braid.parallel.fp8)
    while state.step < stop:
        step = state.step
        lr = lr_at(step, tc)
        for g in opt.param_groups:
            g["lr"] = lr
        parts = []
        overlap.begin_step(step + 1)
        if fp8_stats is not None:  # fp8 numerics: recorded on the last step of a log interval
            fp8_stats.active = (step + 1) % tc.log_every == 0 or step + 1 == stop
        with weights():
            for _ in range(tc.grad_accum):
                if tc.cuda_graphs:  # a new replay: the last one's graph outputs may be reused
                    torch.compiler.cudagraph_mark_step_begin()
                x, y = loader.next_batch()
                loss, p = loss_fn(model, _upload(x, ctx.device), _upload(y, ctx.device), cfg, amp)
                (loss / tc.grad_accum).backward()
                if cast is not None:
                    cast.collect()
                log.micro_stats([p])  # now: CUDA graphs may reuse the router stats' memory
                parts.append(p)
            if fp8_stats is not None:
                fp8_stats.active = False
            overlap.flush()  # every deferred weight grad lands before the norm and the step
        ce = torch.stack([p["ce"] for p in parts]).mean()
        failed = log.write_failed()
        if gate is not None:  # one process: the step is applied or masked on the device
            sums: list[torch.Tensor] = []
            grad_norm = _clip(model, tc.grad_clip, ctx, sums)
            names = [n for n, p in model.named_parameters() if p.grad is not None]
            gate.step(opt, step + 1, ce, grad_norm, torch.stack(sums) if sums else None, names)
            opt.zero_grad(set_to_none=True)
            model.update_router_biases()  # as the host gate: the loads are good either way
            votes, fails = float(sigterm.requested != 0), float(failed is not None)
        else:
            grad_norm = _clip(model, tc.grad_clip, ctx)
            ce_val, gn_val, votes, fails, train_loss = _host_gate(
                cfg, ctx, model, opt, state, ce, grad_norm, sigterm, failed, train_loss, step
            )
        state.step += 1
        state.tokens_seen += micro_tokens * tc.grad_accum
        at_log = state.step % tc.log_every == 0 or state.step == stop
        at_val = state.step % tc.val_every == 0 and state.step < stop
        stopping = (votes > 0 or fails > 0) and state.step < stop  # at `stop` it just finishes
        every = cfg.checkpoint.every
        at_ckpt = stopping or (every and state.step % every == 0 and state.step < stop)
        if gate is not None and (at_log or at_val or at_ckpt):
            # The device gate's one host sync, before anything is logged or saved.
            view = gate.read()
            if view.bad_step >= 0 and not tc.skip_nonfinite:
                raise _nonfinite_error(view.bad_step, view.bad_loss, gate.culprit(view))
            state.skipped_steps = skipped_before + view.skipped
            train_loss, gn_val = view.loss, view.grad_norm
            state.extra["train_loss"] = train_loss
        if at_log:
            now = time.perf_counter()
            tokens, seconds = state.tokens_seen - tokens_last, now - t_last
            log.train(state.step, train_loss, lr, gn_val, state.skipped_steps, tokens, seconds)
            if fp8_stats is not None:
                log.writer.log(state.step, fp8_stats.read())
            t_last, tokens_last = now, state.tokens_seen
        if overlap_metrics := overlap.end_step(state.step):  # timed steps only (report/auto)
            log.writer.log(state.step, overlap_metrics)
        log.progress(state.step, train_loss)
        if at_val:
            log.val(state.step, validate())
        if at_ckpt:
            log.flush()  # metrics first: a run resumed from here never lacks a step's rows
            with sigterm.protect():  # a second signal quits after the save, not inside it
                ckpt.save(model, opt, loader, state)
        if stopping and fails > 0:
            raise BraidError(
                f"{failed or _other_rank_metrics(ckpt.run_dir)}; "
                f"stopped at step {state.step} with a checkpoint: fix it, then "
                f"resume with --run.name={ckpt.run_dir.name}"
            )
        if stopping:
            what = "Ctrl-C" if sigterm.requested == signal.SIGINT else "SIGTERM"
            raise Stopped(
                f"stopped by {what} at step {state.step}/{stop} with a checkpoint; "
                f"resume with --run.name={ckpt.run_dir.name}",
                rank=ctx.rank,
                signum=sigterm.requested or signal.SIGTERM,
            )
    final_val = validate()
    log.val(state.step, final_val)
    log.flush()
    with sigterm.protect():
        ckpt.save(model, opt, loader, state)
    if (late := log.write_failed()) is not None:  # the last flush failed (metrics.on_error=stop)
        raise BraidError(f"{late}; the run finished its steps and wrote its final checkpoint")
    result = {
        "steps": state.step,
        "initial_val_loss": _round(state.initial_val_loss),
        "final_val_loss": _round(final_val),
        "final_train_loss": round(train_loss, 6),
        "tokens_per_s": round(log.mean_tokens_per_s(), 1),
        "mfu": log.mfu(),
        "skipped_steps": state.skipped_steps,
        "fingerprint": cfg.fingerprint(),
    }
    if log.degraded is not None:
        result["degraded"] = log.degraded
    return result


def _other_rank_metrics(run_dir: Path) -> str:
    """What rank 0 can say of another rank's metrics failure (that rank's line names it)."""
    return (
        f"a metrics file of another rank ({run_dir / 'metrics'}/rank_*.duckdb) cannot be "
        "written (that rank's own error line names it)"
    )


def _host_gate(cfg, ctx, model, opt, state, ce, grad_norm, sigterm, failed, train_loss, step):
    """The reference gate: loss, grad norm and stop votes read on the host (one sync per step);
    the step is applied, skipped or stops the run. Returns (loss, grad norm, stop votes,
    metrics-failure votes, train loss)."""
    # A stop signal on any rank, or a metrics file that cannot be written (a host-side flag,
    # no sync), stops every rank after this step; the votes ride on the loss.
    vote = ce.new_tensor([float(sigterm.requested != 0), float(failed is not None)])
    if ctx.distributed:  # the loss of the global batch: every rank reports and decides alike
        from braid.parallel.distributed import all_reduce_mean

        ce, *vote = all_reduce_mean(torch.cat([ce[None], vote]), ctx).unbind()
        vote = torch.stack(vote)
    # One host sync per step: the loss and grad norm decide whether the step is applied.
    ce_val, gn_val, votes, fails = torch.cat([torch.stack([ce, grad_norm.float()]), vote]).tolist()
    if not (_finite(ce_val) and _finite(gn_val)):
        if not cfg.train.skip_nonfinite:
            raise _nonfinite_error(step + 1, not _finite(ce_val), nonfinite_culprit(model))
        state.skipped_steps += 1
        opt.zero_grad(set_to_none=True)
        model.update_router_biases()  # drop the loads counted during the skipped step
    else:
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_biases()
        train_loss = state.extra["train_loss"] = ce_val
    return ce_val, gn_val, votes, fails, train_loss


def _upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch onto the device. To CUDA through pinned memory without blocking: a copy from
    pageable memory waits for the stream (a host sync every micro-step)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _nonfinite_error(step: int, loss_bad: bool, culprit: str) -> BraidError:
    return BraidError(
        f"non-finite {'loss' if loss_bad else 'gradient norm'} at step {step} (first bad "
        f"gradient: {culprit}); no checkpoint was written for it. Lower train.lr or set "
        "train.skip_nonfinite=true"
    )


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 6)


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


def _clip(model, max_norm: float, ctx: ParallelContext, sums=None) -> torch.Tensor:
    from braid.parallel.clip import clip_grad_norm

    return clip_grad_norm(model, max_norm, ctx, sums)
