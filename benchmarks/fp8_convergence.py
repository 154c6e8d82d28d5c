"""Convergence: the same model, data and seed trained with train.precision=bf16 and =fp8.

    PYTHONPATH=src python benchmarks/fp8_convergence.py --steps 2000 --data <prepared dir> \\
        --out benchmarks/results/fp8_convergence_h100.json

Two `braid train` runs (subprocesses, one GPU) of the `small` model (12 layers, hidden 2048,
8 experts top-2 on four layers) with train.compile, batch 32 x 1024 tokens, lr 3e-4 with 200
warmup steps, validation every 100 steps on 16 batches. `--data` is a dataset prepared with
`braid prep` (real text, at least steps x 32768 tokens so no epoch repeats: 66M for 2000
steps); without it the built-in corpus is used (small: it repeats and the curves flatten
early). Writes the JSON (command, device, date, torch, both val curves, final losses, their
relative difference and whether it is within 1%) and a PNG of both validation curves next to
it. Estimate on one H200: `small` is ~0.7B active parameters, so a step of 32768 tokens is
~1.4e14 FLOPs, ~0.35 s at 400 TFLOP/s: about 12 minutes per 2000-step run in bf16 (fp8 less),
plus compile and validation; budget 30 minutes for both. Where one command may run at most 10
minutes, add `--stop-at S`: each unfinished run trains up to step S and stops with a
checkpoint (exit code 3); the next command resumes them. So --stop-at 900, 1800, then 2000;
the comparison is written once both runs reach --steps.
`--parallel` trains both runs at once on the one GPU (a small batch leaves it underused; their
results do not depend on it). `--smoke` runs 6 steps of the tiny model on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, write_result  # noqa: E402

from braid.metrics import read_metrics  # noqa: E402

FINAL_TOL = 0.01  # the bound: final validation losses within 1%


def command(name: str, precision: str, args: argparse.Namespace, run_root: Path) -> list[str]:
    if args.smoke:
        model = [
            "tiny",
            "--train.batch_size=4",
            "--train.seq_len=32",
            "--train.val_every=3",
            "--train.val_batches=1",
            "--train.log_every=1",
            "--train.warmup=2",
        ]
    else:
        model = [
            "small",
            "--train.batch_size=32",
            "--train.seq_len=1024",
            "--train.compile=true",
            "--train.val_every=100",
            "--train.val_batches=16",
            "--train.log_every=10",
            "--train.warmup=200",
            "--train.lr=3e-4",
            "--checkpoint.every=1000000",
        ]
    cmd = [
        sys.executable,
        "-m",
        "braid",
        "train",
        *model,
        f"--train.steps={args.steps}",
        f"--train.precision={precision}",
        f"--train.seed={args.seed}",
        f"--run.dir={run_root}",
        f"--run.name={name}",
        "--train.progress=false",
    ]
    if args.stop_at:
        cmd.append(f"--train.stop_at={args.stop_at}")
    if args.data:
        cmd.append(f"--data.path={args.data}")
    cmd += [f"--{kv}" for kv in args.set]
    print(" ".join(cmd), flush=True)
    return cmd


def train_all(precs: list[str], args: argparse.Namespace) -> dict[str, float]:
    """Train the unfinished runs, one after the other or (`--parallel`) side by side on the
    one GPU; returns each run's wall seconds."""
    cmds = {p: command(p, p, args, Path(args.runs)) for p in precs}
    t0, walls = time.perf_counter(), {}
    if not args.parallel:
        for p, cmd in cmds.items():
            subprocess.run(cmd, check=True, env={**os.environ})
            walls[p] = time.perf_counter() - t0
            t0 = time.perf_counter()
        return walls
    procs = {p: subprocess.Popen(cmd, env={**os.environ}) for p, cmd in cmds.items()}
    for p, proc in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"{p}: braid train exited with {proc.returncode}")
        walls[p] = time.perf_counter() - t0
    return walls


def finished(run_dir: Path) -> int:
    """The step a run's last invocation ended at (0 if it never finished one)."""
    summary = run_dir / "summary.json"
    return json.loads(summary.read_text())["steps"] if summary.exists() else 0


def plot(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, series in curves.items():
        ax.plot(
            [s for s, _ in series],
            [v for _, v in series],
            marker="o",
            markersize=3,
            label=f"{name} val/loss",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("bf16 vs fp8, same seed and data")
    ax.legend()
    fig.savefig(path)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--data", default="", help="a dataset prepared with `braid prep`")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--runs", default="runs/fp8_convergence")
    p.add_argument("--out", default="benchmarks/results/fp8_convergence.json")
    p.add_argument("--set", action="append", default=[], help="section.key=value overrides")
    p.add_argument(
        "--stop-at",
        type=int,
        default=0,
        help="train each run up to this step, "
        "then stop (checkpointed); the same command again continues",
    )
    p.add_argument("--smoke", action="store_true", help="6 steps of the tiny model on CPU")
    p.add_argument(
        "--parallel", action="store_true", help="train both runs at once (one GPU, shared)"
    )
    args = p.parse_args()
    if args.smoke:
        args.steps = 6
    env = environment()
    env["command"] = "PYTHONPATH=src " + env["command"].replace("python3", "python")
    result: dict = {**env, "steps": args.steps, "data": args.data or "built-in corpus"}
    curves = {}
    todo = [p for p in ("bf16", "fp8") if finished(Path(args.runs) / p) < args.steps]
    result["wall_s"] = {p: round(t, 1) for p, t in train_all(todo, args).items()}
    result["parallel"] = args.parallel
    for prec in ("bf16", "fp8"):
        run_dir = Path(args.runs) / prec
        if finished(run_dir) < args.steps:
            print(f"{prec}: stopped at step {finished(run_dir)}; run the same command again")
            return 3
        metrics = read_metrics(run_dir)
        curves[prec] = metrics["val/loss"]
        result[f"{prec}_train_loss"] = metrics["train/loss"]
    result["val_loss"] = curves
    final = {k: v[-1][1] for k, v in curves.items()}
    result["final_val_loss"] = final
    result["final_rel_diff"] = abs(final["fp8"] - final["bf16"]) / final["bf16"]
    result["within_1pct"] = result["final_rel_diff"] <= FINAL_TOL
    png = Path(args.out).with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(curves, png)
    result["plot"] = str(png)
    write_result(args.out, result)
    print({k: result[k] for k in ("final_val_loss", "final_rel_diff", "within_1pct")})
    return 0 if result["within_1pct"] else 1


if __name__ == "__main__":
    sys.exit(main())
