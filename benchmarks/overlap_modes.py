"""Modes, rows and targets of the one-GPU overlap benchmark (benchmarks/overlap_sim.py).

Shared by its MoE layer part (overlap_sim.py) and its training-step part (overlap_sim_train.py):
the overlap modes, one result row per mode, the exchange replayed alone, the summary against
the targets, a Chrome trace of one step, and where one step's time goes (`profile_step`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from common import time_cuda
from overlap_exchange import Movement

from braid.overlap.streams import synchronize

# name: (chunks, split_dw: bool or "all"[, chunk_dw]); None: overlap off (the plain path)
MODES = {
    "off": None,
    "split_dw": (1, True),
    "chunks2": (2, False),
    "chunks4": (4, False),
    "chunks2_split": (2, True),
    "chunks4_split": (4, True),
    "chunks8": (8, False),
    "chunks8_split": (8, True),
    "auto": ("auto", False),
    "auto_split": ("auto", True),
    # chunks of tokens whose routed dW is added per chunk (`overlap.chunk_dw`; the other modes
    # take `--chunk-dw`, default auto): the A/B of the joined dW, where chunks hold tokens
    "chunks4_split_per_chunk": (4, True, "per_chunk"),
    "chunks8_split_per_chunk": (8, True, "per_chunk"),
}


def runnable(modes: dict, chunk_by: str, local: int, out: dict) -> dict:
    """The modes a rank of `local` experts can run: with chunk_by="experts" a fixed C above it
    is refused on the real group as here, so it is left out and named in `out["skipped"]`."""
    keep, skipped = {}, {}
    for mode, sched in modes.items():
        C = None if sched is None else sched[0]
        if chunk_by == "experts" and isinstance(C, int) and C > local:
            skipped[mode] = f"chunks of experts: C={C} > {local} experts per rank"
        else:
            keep[mode] = sched
    if skipped:
        out["skipped"] = skipped
    return keep


def time_alone(exchange, calls: list[Movement], device: torch.device, iters: int) -> float:
    """The recorded movements replayed back to back, each waited at once (median ms)."""

    def replay() -> None:
        for mv in calls:
            buf = torch.empty(mv.shape, dtype=mv.dtype, device=device)
            getattr(exchange, mv.method)(buf, list(mv.send), list(mv.recv)).wait()

    return time_cuda(replay, iters=iters, warmup=2)["median_ms"]


def summarize(rows: dict[str, dict]) -> dict[str, Any]:
    """Best mode, auto against the best fixed mode, and the issue's three targets."""
    fixed = {m: r["median_ms"] for m, r in rows.items() if not m.startswith("auto")}
    best_fixed = min(fixed, key=fixed.get)
    autos = {m: r["median_ms"] for m, r in rows.items() if m.startswith("auto")}
    best_auto = min(autos, key=autos.get) if autos else None
    best = min(rows, key=lambda m: rows[m]["median_ms"])
    out = {
        "best_mode": best,
        "best_fixed_mode": best_fixed,
        "best_exposed_over_exchange_alone": rows[best]["exposed_over_exchange_alone"],
        "worst_slower_than_off": max(r["slower_than_off"] for r in rows.values()),
    }
    if best_auto is not None:
        out["auto_vs_best"] = autos[best_auto] / fixed[best_fixed] - 1
    out["targets_met"] = {
        "best_exposed_le_10pct": out["best_exposed_over_exchange_alone"] <= 0.10,
        "no_mode_over_2pct_slower": out["worst_slower_than_off"] <= 0.02,
        "auto_within_3pct_of_best": out.get("auto_vs_best", 0.0) <= 0.03,
    }
    return out


def row_of(t: dict, tl: dict, alone_ms: float, off_ms: float | None, **extra) -> dict:
    med = t["median_ms"]
    exposed, exchange = tl["exposed_ms"], tl["exchange_ms"]
    return {
        **extra,
        "median_ms": med,
        "min_ms": t["min_ms"],
        "max_ms": t["max_ms"],
        "exchange_ms": exchange,
        "exposed_ms": exposed,
        "dW_ms": tl.get("dW_ms", 0.0),
        "exposed_fraction": exposed / max(exchange, 1e-9),
        "exposed_over_exchange_alone": exposed / max(alone_ms, 1e-9),
        "slower_than_off": 0.0 if off_ms is None else med / off_ms - 1,
    }


def trace(step, device: torch.device, path: str) -> None:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        step()
        synchronize(device)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(path)


def device_spans(events) -> list[tuple[float, float]]:
    """(start, end) us of the device's own work among torch.profiler events: kernels, copies
    and memsets on any stream, not the device-side ranges of `record_function` annotations
    (user annotations, which span from their first kernel to their last, gaps included)."""
    return sorted(
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation
    )


def union_us(spans: list[tuple[float, float]]) -> float:
    """Total length of the union of sorted (start, end) intervals."""
    total, cur = 0.0, None
    for a, b in spans:
        if cur is None or a > cur[1]:
            total += 0.0 if cur is None else cur[1] - cur[0]
            cur = [a, b]
        else:
            cur[1] = max(cur[1], b)
    return total + (0.0 if cur is None else cur[1] - cur[0])


def profile_step(step, device: torch.device) -> dict[str, float]:
    """One step under torch.profiler: where its wall time goes.

    wall_ms: the step on the host's clock, from a synchronized start until the device has
    finished it; host_ms: until `step()` returned (the host's issue time, with its waits at
    host syncs); kernel_ms: the summed time of every device kernel and copy, all streams
    (the simulated exchange's spin kernels included); busy_ms: their union, time some stream
    ran something; idle_ms = wall_ms - busy_ms: time nothing ran at all, the device waiting
    for the host. The profiler records host ops too and slows the host it measures: read
    wall_ms beside the row's unprofiled median_ms. On CPU the device fields are 0.
    """
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        synchronize(device)
        t0 = time.perf_counter()
        step()
        host_ms = (time.perf_counter() - t0) * 1e3
        synchronize(device)
        wall_ms = (time.perf_counter() - t0) * 1e3
    spans = device_spans(prof.events())
    busy_ms = union_us(spans) / 1e3
    return {
        "wall_ms": wall_ms,
        "host_ms": host_ms,
        "kernel_ms": sum(b - a for a, b in spans) / 1e3,
        "busy_ms": busy_ms,
        "idle_ms": max(wall_ms - busy_ms, 0.0) if spans else 0.0,
        "kernels": len(spans),
    }
