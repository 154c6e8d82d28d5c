"""Overlap measured on ONE GPU: the simulated exchange at 4-rank traffic, every overlap mode.

    PYTHONPATH=src python benchmarks/overlap_sim.py --out benchmarks/results/overlap_sim_h200.json \
        --trace benchmarks/results/overlap_sim_trace_h200.json                  # one H200, < 8 min
    PYTHONPATH=src python benchmarks/overlap_sim.py --smoke --out /tmp/s.json     # CPU, seconds

One process stands in for one rank of an expert-parallel group of `--ranks` (4): every MoE
layer's exchange is `exchange.algorithm = "simulated"` (docs/exchange.md), which moves rows like
the local exchange (results bitwise the same) but keeps a communication stream busy for the
time the measured 4x H200 NVLink all-to-all takes for the same payload, with real device
copies of the bytes that would leave the rank. The rank holds all E experts and sees about the
N*K rows a real rank's E/W experts would (balanced routing); fp32 weights, bf16 autocast.

Part `layer`: one MoE layer forward + backward at 32768 tokens, fine-grained (64 experts top-8,
2048/1408) and Mixtral-like (8 experts top-2, 4096/14336). Part `train`: forward + backward + AdamW
step of `medium` and `moonlet` with `--train-layers` layers (default 4: the whole models do not fit
one GPU with their optimizer state; `n_layers`/`layers_override` in the JSON), batch 2 x 4096
tokens. Modes: off (the plain path), split_dw, chunks2, chunks4, chunks8, chunks2_split,
chunks4_split, chunks8_split, auto (the planner's C), auto_split (chunks hold experts or tokens as
`--chunk-by` says: `overlap.chunk_by`, default auto); the train part adds split_all,
chunks2_all, chunks4_all, chunks8_all and auto_all (`overlap.split_dw = "all"`: the attention
and dense-FFN dW of the blocks above each MoE layer, and an untied head's, deferred into its
windows too; the layer part has no attention).
Per mode: `median_ms` (CUDA events; both parts time every mode once per round, `--rounds`, and
take the median of the rounds' medians, so that clock drift over the run does not favour the
modes timed first),
`exchange_ms`/`exposed_ms` from the overlap timeline (one timed step; off: its C=1 twin, the plain
path's order), `exposed_over_exchange_alone` (exposed / the movements of off's step replayed
alone), `slower_than_off`, what the chunks hold (`chunk_axis`; train: `chunk_axes` over the MoE
layers: "experts" or "tokens", as a rank of the simulated group cuts them,
`TokenDispatcher.chunk_local`), what chunks of tokens did with the routed dW (`chunk_dw`:
"joined" or "per_chunk", `overlap.chunk_dw`, which `--chunk-dw` sets; the layer part's
chunks4_split_per_chunk and chunks8_split_per_chunk force per chunk, the A/B), and per
layer/config `auto_vs_best` (auto's best mode time
over the best fixed mode's, minus 1) and `best_mode`. Every mode's results are checked against
off's first (layer: output and grads; train: the first two losses). The training-step part lives in
overlap_sim_train.py, the modes, rows and targets both parts share in overlap_modes.py. `--trace
PATH` writes a Chrome trace (torch.profiler) of one training step in mode `--trace-mode`
(auto_split; of the layer's fine-grained shape if only the layer part runs). `--profile` adds to
each training-step row one profiled step's `profile`: wall, host issue, summed kernel, device-busy
and device-idle ms (overlap_modes.profile_step), to tell a host-bound mode from an exposed one.
`--modes a,b` times only those modes (and off, the reference). `--high-priority` runs the
simulated exchange on a high-priority stream (`exchange.high_priority`).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from common import environment, time_cuda, write_result  # noqa: E402
from overlap_exchange import record  # noqa: E402
from overlap_modes import MODES, row_of, runnable, summarize, time_alone, trace  # noqa: E402
from overlap_sim_train import TRAIN_MODES, bench_train  # noqa: E402

from braid.exchange import get_exchange  # noqa: E402
from braid.exchange.config import ExchangeConfig  # noqa: E402
from braid.model.config import ModelConfig  # noqa: E402
from braid.moe.config import MoEConfig  # noqa: E402
from braid.moe.layer import MoE  # noqa: E402
from braid.overlap.config import OverlapConfig, chunk_axis  # noqa: E402
from braid.overlap.engine import LayerOverlap  # noqa: E402
from braid.overlap.measure import measure  # noqa: E402
from braid.overlap.planner import CANDIDATES, choose_chunks  # noqa: E402
from braid.overlap.session import layer_shape  # noqa: E402
from braid.overlap.streams import Clock, synchronize  # noqa: E402
from braid.overlap.trial import ChunkTrial, trial_candidates  # noqa: E402

SHAPES = {"fine_64e_top8": (64, 8, 2048, 1408), "mixtral_8e_top2": (8, 2, 4096, 14336)}
SMOKE_SHAPES = {"smoke_16e_top4": (16, 4, 32, 48), "smoke_8e_top2": (8, 2, 64, 96)}


def sim_config(args) -> ExchangeConfig:
    return ExchangeConfig(
        algorithm="simulated", simulate_ranks=args.ranks, high_priority=args.high_priority
    )


# -- the MoE layer ----------------------------------------------------------------------------


def chunk_trial(lo: LayerOverlap, step, predicted: tuple, rounds: int, device) -> tuple[int, dict]:
    """`overlap.trial_steps` on one layer (`braid.overlap.trial`, as the session runs it):
    (the C kept, the fastest measured ms per candidate)."""
    trial = ChunkTrial({0: trial_candidates(predicted[2], predicted[0])}, rounds, {0: lo.chunks})
    for k in range(trial.length):
        lo.chunks = trial.chunks_at(k)[0]
        lo.timeline.timing = True
        step()
        synchronize(device)
        lo.timeline.timing = False
        trial.record(k, {0: lo.timeline.summary()["measured_ms"]})
    chosen = trial.decide(lambda t: t)[0]
    return chosen, {c: ms for (_, c), ms in trial.best_ms.items()}


def make_layer(shape: tuple, tokens: int, device) -> tuple[MoE, torch.Tensor, torch.Tensor]:
    """(layer, x, output grad): a MoE layer of `shape` (E, top_k, dim, ffn) with seeded weights
    and inputs of `tokens` rows (fp32; the caller's autocast sets the GEMM dtype)."""
    E, k, H, F = shape
    cfg = MoEConfig(num_experts=E, top_k=k, expert_hidden=F, aux_loss_coef=0.0, z_loss_coef=0.0)
    with torch.device(device):
        moe = MoE(ModelConfig(dim=H), cfg)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    x = torch.randn(tokens, H, device=device, generator=gen)
    g = torch.randn(tokens, H, device=device, generator=gen) * 1e-2
    return moe, x, g


def layer_step(moe: MoE, x: torch.Tensor, g: torch.Tensor, amp) -> tuple:
    """One forward + backward of the layer (grads reset first; deferred dW flushed):
    (output, input with its grad)."""
    for p in moe.parameters():
        p.grad = None
    xx = x.detach().requires_grad_()
    with amp:
        y, _ = moe(xx)
    y.backward(g)
    if moe.overlap is not None:
        moe.overlap.queue.flush()
    return y, xx


def bench_layer(name: str, shape: tuple, args, device, amp, dtype, log) -> dict:
    E, k, H, F = shape
    moe, x, g = make_layer(shape, args.tokens, device)
    moe.dispatcher.exchange = get_exchange("simulated")(None, None, sim_config(args))
    shp = layer_shape(moe, args.tokens, dtype)
    cost = measure(
        shp, moe.dispatcher.exchange, moe.experts, device, dtype, dispatcher=moe.dispatcher,
        axis=lambda c: chunk_axis(args.chunk_by, c, moe.dispatcher.chunk_local, strict=False),
    )  # fmt: skip
    cands = tuple(c for c in CANDIDATES if c <= OverlapConfig().max_chunks)
    L = moe.dispatcher.chunk_local  # experts per rank of the simulated group
    axis = lambda c: chunk_axis(args.chunk_by, c, L)  # noqa: E731
    cands = tuple(c for c in cands if args.chunk_by != "experts" or c <= L)
    tables = {
        split: choose_chunks(shp, split, cost, cands, axis, args.chunk_dw)
        for split in (False, True)
    }
    plan = {split: t[0] for split, t in tables.items()}
    clock = Clock(device)

    def step():
        y, xx = layer_step(moe, x, g, amp)
        return [y.detach().float(), xx.grad.float()] + [
            p.grad.float() for p in moe.experts.parameters()
        ]

    def timeline() -> dict:
        tl = moe.overlap.timeline
        tl.timing = True
        step()
        synchronize(device)
        tl.timing = False
        return tl.summary()

    with record(moe.dispatcher.exchange) as calls:
        ref = step()
    alone = time_alone(moe.dispatcher.exchange, calls, device, args.iters)
    planned = dict(plan)
    trials = {}
    if args.trial_steps > 0:  # the chunk trial of chunks="auto", as OverlapSession runs it
        for split in (False, True):
            lo = moe.overlap = LayerOverlap(
                0, plan[split], split, clock, chunk_by=args.chunk_by, chunk_dw=args.chunk_dw
            )
            got = chunk_trial(lo, step, tables[split], args.trial_steps, device)
            plan[split], trials[split] = got
        moe.overlap = None
    out: dict[str, Any] = {
        "shape": {"experts": E, "top_k": k, "hidden": H, "ffn": F, "tokens": args.tokens},
        "exchange_alone_ms": alone,
        "exchange_alone_movements": len(calls),
        "planned_chunks": {"split_dw=false": planned[False], "split_dw=true": planned[True]},
        "trial_chunks": {f"split_dw={str(k).lower()}": plan[k] for k in trials},
        "trial_best_ms": {f"split_dw={str(k).lower()}": v for k, v in trials.items()},
        "cost_model": cost.__dict__,
        "modes": {},
    }
    engines: dict[str, Any] = {}  # mode -> its LayerOverlap (None: off)
    checked: dict[str, tuple] = {}
    modes = runnable(MODES, args.chunk_by, L, out)
    for mode, sched in modes.items():  # results first: every mode against off
        C, split, *dw = (None, False) if sched is None else sched
        dw = dw[0] if dw else args.chunk_dw
        if sched is not None:
            C = plan[split] if C == "auto" else C
            moe.overlap = LayerOverlap(0, C, split, clock, chunk_by=args.chunk_by, chunk_dw=dw)
        else:
            moe.overlap = None
        got = step()
        err = max(
            float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
            for a, b in zip(got, ref, strict=True)
        )
        if err > args.tol:
            raise SystemExit(f"layer {name}/{mode}: results differ from off: {err:.2e}")
        engines[mode] = moe.overlap
        if moe.overlap is None:
            moe.overlap = LayerOverlap(0, 1, False, clock)  # the plain path's order, timed
        checked[mode] = (C, split, err, timeline(), moe.overlap.routed_dw())
    # Timing in rounds, every mode once per round (the GPU's clocks drift over a run: timing
    # each mode once, in order, would bias the later modes); per mode the median over all.
    times: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode in modes:
            moe.overlap = engines[mode]
            times[mode].append(time_cuda(step, iters=args.iters, warmup=1))
    off_ms = None
    for mode in modes:
        C, split, err, tl, joined = checked[mode]
        rounds = times[mode]
        t = {
            "median_ms": statistics.median(r["median_ms"] for r in rounds),
            "min_ms": min(r["min_ms"] for r in rounds),
            "max_ms": max(r["max_ms"] for r in rounds),
        }
        row = row_of(t, tl, alone, off_ms, chunks=C or 1, split_dw=split, rel_err_vs_off=err)
        row["chunk_axis"] = axis(C or 1)
        row["chunk_dw"] = joined  # chunks of tokens: joined or per_chunk
        row["round_medians_ms"] = [r["median_ms"] for r in rounds]
        off_ms = off_ms or row["median_ms"]
        out["modes"][mode] = row
        log(
            f"layer {name:>16} {mode:>13}: C={C or 1} {row['median_ms']:9.2f} ms  exchange "
            f"{row['exchange_ms']:7.2f} (alone {alone:7.2f}) exposed {row['exposed_ms']:7.2f} "
            f"({100 * row['exposed_over_exchange_alone']:5.1f}%)  "
            f"vs off {100 * row['slower_than_off']:+5.1f}%"
        )
    if args.trace and args.only_layer_trace and name == next(iter(args.shapes)):
        moe.overlap = engines[args.trace_mode]
        trace(step, device, args.trace)
        C = checked[args.trace_mode][0] or 1
        out["trace"] = {"path": args.trace, "mode": args.trace_mode, "chunks": C}
    moe.overlap = None
    out.update(summarize(out["modes"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="", help="JSON result file")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, a few seconds")
    ap.add_argument("--parts", default="layer,train", help="comma list of: layer, train")
    ap.add_argument("--ranks", type=int, default=4, help="ranks whose traffic is simulated")
    ap.add_argument("--tokens", type=int, default=0, help="layer: tokens (32768)")
    ap.add_argument("--iters", type=int, default=0, help="layer: timed iterations (5)")
    ap.add_argument("--train-configs", default="medium,moonlet")
    ap.add_argument("--train-layers", type=int, default=-1, help="n_layers (4; 0: config's)")
    ap.add_argument("--train-batch", type=int, default=0, help="sequences (2)")
    ap.add_argument("--train-seq", type=int, default=0, help="tokens per sequence (4096)")
    ap.add_argument("--train-iters", type=int, default=0, help="timed steps per mode (3)")
    ap.add_argument("--trace", default="", help="Chrome trace of one step to PATH")
    ap.add_argument("--trace-mode", default="auto_split", help="the traced step's mode")
    ap.add_argument(
        "--profile", action="store_true", help="train: one profiled step per mode (host/idle)"
    )
    ap.add_argument("--rounds", type=int, default=0, help="layer: timing rounds (3)")
    ap.add_argument("--chunk-by", default="auto", help="overlap.chunk_by: auto, experts, tokens")
    ap.add_argument("--chunk-dw", default="auto", help="overlap.chunk_dw: auto, joined, per_chunk")
    ap.add_argument(
        "--high-priority", action="store_true", help="exchange.high_priority (its own stream)"
    )
    ap.add_argument(
        "--trial-steps",
        type=int,
        default=OverlapConfig().trial_steps,
        help="auto modes: overlap.trial_steps (0: the planner's pick, untimed)",
    )
    ap.add_argument(
        "--modes", default="", help="comma list of modes to time (default: all; off always)"
    )
    args = ap.parse_args()
    parts = args.parts.split(",")
    if args.modes:
        keep = {"off", *args.modes.split(",")}
        if unknown := keep - set(TRAIN_MODES):
            raise SystemExit(f"--modes: unknown {sorted(unknown)}; expected of {list(TRAIN_MODES)}")
        for table in (MODES, TRAIN_MODES):  # in place: both parts iterate these tables
            for m in set(table) - keep:
                del table[m]
    modes = set(TRAIN_MODES if "train" in parts else MODES)
    if args.trace and args.trace_mode not in modes:
        raise SystemExit(
            f"--trace-mode: unknown {args.trace_mode!r}; expected one of {sorted(modes)}"
        )
    if unknown := set(parts) - {"layer", "train"}:
        raise SystemExit(f"--parts: unknown {sorted(unknown)}; expected layer and/or train")
    if args.smoke:
        torch.set_num_threads(1)
        device, amp = torch.device("cpu"), torch.autocast("cpu", enabled=False)
        dtype = torch.float32
        args.shapes, defaults = SMOKE_SHAPES, (32, 1, 1, 16, 1, 1)
        args.tol, args.train_tol = 1e-5, 1e-5
    else:
        if not torch.cuda.is_available():
            raise SystemExit("overlap_sim.py needs a CUDA GPU (or --smoke for the CPU check)")
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        amp, dtype = torch.autocast("cuda", dtype=torch.bfloat16), torch.bfloat16
        args.shapes, defaults = SHAPES, (32768, 5, 2, 4096, 3, 3)
        args.tol, args.train_tol = 3e-2, 5e-3
    args.tokens = args.tokens or defaults[0]
    args.iters = args.iters or defaults[1]
    args.train_batch = args.train_batch or defaults[2]
    args.train_seq = args.train_seq or defaults[3]
    args.train_iters = args.train_iters or defaults[4]
    args.rounds = args.rounds or defaults[5]
    if args.train_layers < 0:
        args.train_layers = 0 if args.smoke else 4
    args.only_layer_trace = "train" not in parts
    args.traced = False
    t0 = time.perf_counter()

    def log(line: str) -> None:
        print(line, flush=True)

    result: dict[str, Any] = {
        **environment(),
        "command": "PYTHONPATH=src python " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "exchange": {"algorithm": "simulated", **sim_config(args).__dict__},
        "smoke": args.smoke,
        "complete": False,
        "layer": {},
        "train": {},
    }

    def save() -> None:
        result["seconds"] = round(time.perf_counter() - t0, 1)
        if args.out:
            write_result(args.out, result)

    if "layer" in parts:
        for name, shape in args.shapes.items():
            result["layer"][name] = bench_layer(name, shape, args, device, amp, dtype, log)
            save()
    if "train" in parts:
        for name in args.train_configs.split(","):
            result["train"][name] = bench_train(name, args, log)
            save()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result["complete"] = True
    save()
    log(f"done in {result['seconds']} s" + (f"; wrote {args.out}" if args.out else ""))


if __name__ == "__main__":
    main()
