"""The trainer's handle on the overlap engine: install, plan, flush, timeline and metrics.

Phases (called by `braid.train.trainer`):
  1. `OverlapSession.install(model, cfg, ...)`, after the model is built and parallelized (the
     EP exchange is in place): with chunks="auto" (or report on, to show a prediction beside
     the measurement) measure the cost model once per distinct layer shape (collective: every
     rank), pick C per MoE layer, log the plan, and set `moe.overlap` to a `LayerOverlap`.
     Overlap off and nothing to report or trace: nothing is installed (the plain path).
     With split_dw = "all", the attention / dense-FFN linears of the blocks above each MoE
     layer defer their dW into its windows (`braid.overlap.dense`; logs which block goes where);
  2. each optimizer step: `begin_step(step)` turns on timing at log steps (report or auto) and
     the profiler at `trace_step`; micro-steps; `flush()` before clipping — a safety net, the
     flush points at the layer inputs have already emptied every queue; `end_step(step)`
     synchronizes (timed steps only) and returns the `overlap/...` metrics of that step.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from braid.overlap.config import OverlapConfig, chunk_axis
from braid.overlap.dense import HEAD, defer_dense, restore_dense
from braid.overlap.engine import LayerOverlap
from braid.overlap.measure import max_over_world, measure
from braid.overlap.planner import (
    CANDIDATES,
    CostModel,
    LayerShape,
    choose_chunks,
    describe,
    predict_ms,
)
from braid.overlap.streams import Clock, synchronize
from braid.overlap.timeline import format_summary
from braid.overlap.trial import ChunkTrial, describe_trial, trial_candidates


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def describe_dense(where: dict[int, int]) -> str:
    """One line: which blocks' attention / dense-FFN dW (and the head's) waits for which MoE
    layer's windows."""
    by: dict[int, list[int]] = {}
    for block, moe in sorted(where.items()):
        if block != HEAD:
            by.setdefault(moe, []).append(block)
    parts = [
        f"{'blocks' if len(b) > 1 else 'block'} {','.join(map(str, b))}"
        + (" and the head" if where.get(HEAD) == m else "")
        + f" -> moe{m}"
        for m, b in sorted(by.items())
    ]
    if HEAD in where and where[HEAD] not in by:
        parts.append(f"the head -> moe{where[HEAD]}")
    return "overlap split_dw=all: attention/dense dW of " + ("; ".join(parts) or "no block")


def layer_shape(
    moe: Any, tokens_per_rank: int, dtype: torch.dtype, stream: torch.dtype | None = None
) -> LayerShape:
    """The planner's view of one MoE layer (duck-typed `braid.moe.layer.MoE`). `dtype` is the
    compute (autocast) dtype: the dispatch exchanges carry the layer input (the residual
    stream: `stream`, or by default the parameters' dtype), the combine exchanges the experts'
    output (`dtype`)."""
    shared = 0 if moe.shared is None else moe.shared.w2.weight.shape[1]
    x_bytes = moe.router.weight.element_size() if stream is None else stream.itemsize
    wire = (x_bytes + dtype.itemsize) / 2
    return LayerShape(
        tokens=tokens_per_rank,
        dim=moe.experts.dim,
        hidden=moe.experts.hidden,
        top_k=moe.dispatcher.top_k,
        num_experts=moe.dispatcher.num_experts,
        ep=moe.dispatcher.exchange.traffic_ranks,
        elem_bytes=wire,
        shared_hidden=shared,
        local_experts=moe.dispatcher.num_local,  # all E with a simulated exchange's one rank
    )


class OverlapSession:
    def __init__(
        self,
        cfg: OverlapConfig,
        layers: dict[int, LayerOverlap],
        device: torch.device,
        log_every: int = 1,
        is_main: bool = True,
        trace_dir: Path | None = None,
        rank: int = 0,
        log: Callable[[str], None] = _stderr,
    ):
        self.cfg, self.layers, self.device = cfg, layers, device
        self.log_every, self.is_main = log_every, is_main
        self.trace_dir, self.rank = trace_dir, rank
        self.log = log
        self._timed = False
        self._logged = False  # this step's metrics are due (a log or trace step)
        self._prof: Any = None
        self._trial: ChunkTrial | None = None  # chunks="auto" with trial_steps > 0
        self._trial_index = 0
        self._tables: dict[int, dict[int, float]] = {}  # layer -> predicted ms per C
        self._moes: dict[int, nn.Module] = {}
        self._agree: Callable[[list[float]], list[float]] = lambda t: t

    @classmethod
    def install(
        cls,
        model: nn.Module,
        cfg: OverlapConfig,
        *,
        device: torch.device,
        tokens_per_rank: int,
        dtype: torch.dtype,
        stream: torch.dtype | None = None,
        log_every: int = 1,
        is_main: bool = True,
        run_dir: Path | None = None,
        rank: int = 0,
        log: Callable[[str], None] = _stderr,
    ) -> OverlapSession:
        """Plan and install a `LayerOverlap` on every MoE layer that needs one. `dtype`: the
        compute dtype; `stream`: the residual stream's (`braid.train.loss.stream_dtype`; by
        default the parameters')."""
        moes = model.moe_modules()
        watch = cfg.report or cfg.trace_step > 0
        restore_dense(model)  # a model installed before keeps no deferred linear
        split = cfg.defers_dw  # routed and shared dW deferred ("experts" and "all")
        if not moes or (cfg.chunks == 1 and not split and not watch):
            return cls(cfg, {}, device, log_every, is_main, run_dir, rank, log)
        clock, layers = Clock(device), {}
        models: dict[LayerShape, CostModel] = {}
        tried: dict[int, tuple[int, ...]] = {}  # the chunk trial's candidates per layer
        planned: dict[int, int] = {}
        tables: dict[int, dict[int, float]] = {}
        for i, moe in moes.items():
            shape = layer_shape(moe, tokens_per_rank, dtype, stream)
            plan_split = split  # routed dW deferred, FSDP expert units too (fsdp_unit)
            L = moe.dispatcher.chunk_local  # experts a chunk may divide (the group's, per rank)
            axis = lambda c, L=L: chunk_axis(cfg.chunk_by, c, L)  # noqa: E731
            # What the planner times at C chunks: the axis, or tokens where experts cannot be.
            probe = lambda c, L=L: chunk_axis(cfg.chunk_by, c, L, strict=False)  # noqa: E731
            cost = None
            if cfg.chunks == "auto" or cfg.report:
                if shape not in models:
                    models[shape] = measure(
                        shape,
                        moe.dispatcher.exchange,
                        moe.experts,
                        device,
                        dtype,
                        dispatcher=moe.dispatcher,
                        axis=probe,
                    )
                cost = models[shape]
            # fp8 experts hand over finished dW tasks: their chunks' dW stays per chunk
            fp8 = getattr(moe.experts, "fp8_stats", None) is not None
            chunk_dw = "per_chunk" if fp8 else cfg.chunk_dw
            if cfg.chunks == "auto":
                cands = tuple(
                    c
                    for c in CANDIDATES
                    if c <= cfg.max_chunks and (c <= L or cfg.chunk_by != "experts")
                )
                chunks, predicted, table = choose_chunks(
                    shape, plan_split, cost, cands, axis, chunk_dw
                )
                if is_main:
                    log(describe(i, shape, chunks, table, plan_split, cost))
                if cfg.trial_steps > 0 and shape.ep > 1:  # nothing to overlap without EP
                    tried[i], planned[i], tables[i] = trial_candidates(table, chunks), chunks, table
            else:
                chunks = cfg.chunks
                axis(chunks)  # chunk_by="experts" with more chunks than experts: a clear error
                predicted = None
                if cost is not None:
                    predicted = predict_ms(shape, chunks, plan_split, cost, axis(chunks), chunk_dw)
            if chunks == 1 and not split and not watch and i not in tried:
                continue  # the planner chose the plain path
            layers[i] = moe.overlap = LayerOverlap(
                i, chunks, split, clock, chunk_by=cfg.chunk_by, chunk_dw=chunk_dw
            )
            layers[i].predicted_ms = predicted
            if cfg.report:
                moe.dispatcher.exchange.enable_timing()  # handles measure their own time
        if cfg.split_dw == "all":
            where = defer_dense(model, layers)
            if is_main:
                log(describe_dense(where))
        session = cls(cfg, layers, device, log_every, is_main, run_dir, rank, log)
        if tried:
            session._trial = ChunkTrial(tried, cfg.trial_steps, planned)
            session._tables, session._moes = tables, moes
            exchange = moes[next(iter(tried))].dispatcher.exchange
            session._agree = lambda t: max_over_world(t, exchange, device)
        return session

    @property
    def trial_steps_left(self) -> int:
        """Steps until the chunk trial has chosen (0: none running)."""
        return 0 if self._trial is None else self._trial.length - self._trial_index

    def flush(self) -> int:
        """Run every queued weight gradient (before clipping and the optimizer step)."""
        return sum(lo.flush() for lo in self.layers.values())

    def begin_step(self, step: int) -> None:
        cfg = self.cfg
        at_log = step % self.log_every == 0 and (cfg.report or cfg.chunks == "auto")
        self._logged = bool(self.layers) and (at_log or step == cfg.trace_step)
        self._timed = self._logged
        if self._trial is not None:  # every step of the trial is timed
            for i, c in self._trial.chunks_at(self._trial_index).items():
                self.layers[i].chunks = c
            self._timed = True
        for lo in self.layers.values():
            lo.timeline.timing = self._timed
        if step == cfg.trace_step and self.trace_dir is not None:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=acts)
            self._prof.__enter__()

    def end_step(self, step: int) -> dict[str, float]:
        """The step's `overlap/...` metrics (empty unless timed); prints the report table."""
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            path = Path(self.trace_dir) / f"overlap_trace_step{step}_rank{self.rank}.json"
            with contextlib.suppress(OSError):  # so that the check below sees this export's
                path.unlink(missing_ok=True)
            self._prof.export_chrome_trace(str(path))  # logs, but does not raise, on failure
            self._prof = None
            if not path.is_file():
                self.log(
                    f"warning: overlap: could not write the Chrome trace of step {step} to {path}"
                )
            elif self.is_main:
                self.log(f"overlap: Chrome trace of step {step} written to {path}")
        if not self._timed:
            return {}
        synchronize(self.device)  # events must have completed before they are read
        rows = {i: lo.timeline.summary() for i, lo in self.layers.items()}
        for lo in self.layers.values():
            lo.timeline.timing = False
        self._timed = False
        if self._trial is not None:
            self._trial.record(self._trial_index, {i: r["measured_ms"] for i, r in rows.items()})
            self._trial_index += 1
            if self._trial_index == self._trial.length:
                self._end_trial()
                rows = {i: r for i, r in rows.items() if i in self.layers}
        if not self._logged:
            return {}
        out: dict[str, float] = {}
        for i, r in rows.items():
            lo = self.layers[i]
            out[f"overlap/exposed_ms/layer{i}"] = r["exposed_ms"]
            out[f"overlap/exchange_ms/layer{i}"] = r["exchange_ms"]
            out[f"overlap/measured_ms/layer{i}"] = r["measured_ms"]
            out[f"overlap/dW_ms/layer{i}"] = r.get("dW_ms", 0.0) + r.get("dW_flush_ms", 0.0)
            if self.cfg.split_dw == "all":  # the blocks above: in the windows + at the flush
                dense = r.get("dense_dW_ms", 0.0) + r.get("dense_dW_flush_ms", 0.0)
                out[f"overlap/dense_dW_ms/layer{i}"] = dense
            out[f"overlap/chunks/layer{i}"] = float(lo.chunks)
            if lo.predicted_ms is not None:
                out[f"overlap/predicted_ms/layer{i}"] = lo.predicted_ms
        if self.cfg.report and self.is_main:
            self.log(format_summary(step, rows, self.layers))
        return out

    def _end_trial(self) -> None:
        """Keep every tried layer's fastest C (agreed across ranks); a layer back at the plain
        path with nothing to defer or report loses its engine."""
        trial, self._trial = self._trial, None
        chosen = trial.decide(self._agree)
        watch = self.cfg.report or self.cfg.trace_step > 0
        for i, c in chosen.items():
            lo = self.layers[i]
            lo.chunks, lo.predicted_ms = c, self._tables[i][c]
            if self.is_main:
                self.log(describe_trial(i, trial.best_ms, c, trial.planned[i]))
            if c == 1 and not lo.split_dw and not watch:
                self._moes[i].overlap = None
                del self.layers[i]
