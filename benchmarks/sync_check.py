"""Does a dropless training step on one GPU ever wait for the host? Runs `braid train` itself.

    PYTHONPATH=src python benchmarks/sync_check.py --out benchmarks/results/sync_check_h200.json \
        [--compile] [--cuda-graphs] [--mode warn|error]

The trainer's own loop runs a small MoE model (shared experts, aux-loss-free bias, dropless) on
a prepared toy corpus. After --warmup steps, `torch.cuda.set_sync_debug_mode` is switched on at
the start of every step and off where the loop reads the device gate (log, validation and
checkpoint steps, which are allowed one host sync: train/step.py), so every other step is
checked from the batch upload through the optimizer step. In `warn` mode (the default) every
synchronizing call is recorded with its Python stack, so one run lists them all; `error` stops
at the first. Exit code 1 if any step synced; the JSON lists the calls and the steps checked.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from common import environment, write_result  # noqa: E402

import braid.train.trainer as trainer  # noqa: E402
from braid.config import load_config  # noqa: E402
from braid.overlap.session import OverlapSession  # noqa: E402
from braid.train.step import DeviceGate  # noqa: E402

MODEL = [
    "--model.vocab_size=512",
    "--model.dim=256",
    "--model.n_heads=4",
    "--model.n_layers=3",
    "--model.ffn_hidden=512",
    "--moe.num_experts=8",
    "--moe.top_k=2",
    "--moe.expert_hidden=256",
    "--moe.num_shared_experts=1",
    "--moe.bias_balance=true",
    "--moe.score_func=sigmoid",
    "--moe.first_k_dense=1",
    "--train.batch_size=8",
    "--train.seq_len=256",
]


class Guard:
    """Arms the sync check at each step's start (after warm-up), disarms it at a gate read."""

    def __init__(self, mode: str, warmup: int):
        self.mode, self.warmup = mode, warmup
        self.armed, self.checked, self.syncs = False, [], []
        self.step = 0

    def begin(self, step: int) -> None:
        self.step = step
        if step > self.warmup:
            self.armed = True
            self.checked.append(step)
            torch.cuda.set_sync_debug_mode(self.mode)

    def disarm(self) -> None:
        if self.armed:
            torch.cuda.set_sync_debug_mode(0)
            self.armed = False

    def clean_steps(self) -> list[int]:
        """Steps checked that made no synchronizing call."""
        bad = {s["step"] for s in self.syncs}
        return [s for s in self.checked if s not in bad]

    def record(self, message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message)
        if "prototype feature" in text:  # torch's notice on switching the mode on, not a sync
            return
        if "synchronizing" in text and self.armed:
            stack = "".join(traceback.format_stack(limit=14)[:-2])
            self.syncs.append({"step": self.step, "message": str(message), "stack": stack})


def toy_data(root: Path) -> Path:
    from braid.data.prep import prepare

    rnd = random.Random(0)
    words = "a dropless step routes every token and never waits for the host".split()
    (root / "text.txt").write_text(" ".join(rnd.choice(words) for _ in range(60000)))
    prepare([root / "text.txt"], root / "data", vocab_size=512, val_fraction=0.05, progress=False)
    return root / "data"


def run(args) -> dict:
    guard = Guard(args.mode, args.warmup)
    begin, read = OverlapSession.begin_step, DeviceGate.read

    def begin_step(self, step):  # the start of every optimizer step
        begin(self, step)
        guard.begin(step)

    def gate_read(self):  # the loop's one allowed host sync, at log/val/checkpoint steps
        guard.disarm()
        return read(self)

    OverlapSession.begin_step, DeviceGate.read = begin_step, gate_read
    warnings.showwarning = guard.record
    warnings.simplefilter("always")
    with tempfile.TemporaryDirectory() as tmp:
        data = toy_data(Path(tmp))
        steps = args.warmup + args.checked + 1
        overrides = MODEL + [
            f"--data.path={data}",
            f"--run.dir={tmp}/runs",
            f"--train.steps={steps}",
            f"--train.log_every={steps}",
            f"--train.val_every={steps}",
            "--train.val_batches=1",
            "--checkpoint.every=0",
            "--train.progress=false",
            "--parallel.ep=1",
            f"--train.compile={str(args.compile or args.cuda_graphs).lower()}",
            f"--train.cuda_graphs={str(args.cuda_graphs).lower()}",
        ]
        cfg = load_config(None, overrides)
        error = None
        try:
            result = trainer.train(cfg)
        except RuntimeError as e:  # error mode: the first synchronizing call
            torch.cuda.set_sync_debug_mode(0)
            error, result = f"step {guard.step}: {e}\n{traceback.format_exc(limit=20)}", {}
    guard.disarm()
    return {
        "env": environment(),
        "mode": args.mode,
        "compile": args.compile,
        "cuda_graphs": args.cuda_graphs,
        "warmup_steps": args.warmup,
        "steps_checked": guard.checked,
        "steps_clean": guard.clean_steps(),
        "syncs": guard.syncs,
        "error": error,
        "final_train_loss": result.get("final_train_loss"),
        "ok": error is None and not guard.syncs and len(guard.clean_steps()) >= args.checked,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=("warn", "error"), default="warn")
    p.add_argument("--warmup", type=int, default=2, help="steps run before the check is armed")
    p.add_argument("--checked", type=int, default=4, help="steps checked after warm-up")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--cuda-graphs", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("sync_check needs a CUDA device", file=sys.stderr)
        return 2
    out = run(args)
    write_result(args.out, out)
    for s in out["syncs"][:10]:
        print(f"step {s['step']}: {s['message']}\n{s['stack']}", file=sys.stderr)
    print({k: out[k] for k in ("ok", "steps_checked", "error")}, flush=True)
    print(f"{len(out['syncs'])} synchronizing calls in checked steps", flush=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
