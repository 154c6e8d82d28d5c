"""Host cost of issuing one movement: the simulated exchange against NCCL's path, one GPU.

    PYTHONPATH=src python benchmarks/exchange_host.py --out benchmarks/results/exchange_host.json
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/exchange_host.py --smoke   # CPU, gloo

Why: chunks multiply the movements of a layer (4 per chunk in forward and backward), so the
host time each costs adds up where a step is short. The one-GPU overlap benchmark measures
chunking with the simulated exchange (braid.exchange.simulated), whose movement is a copy,
timing events and a spin kernel's launch; with several GPUs the same movement is one NCCL
all_to_all_single. This puts the two side by side, so the simulation's host cost can be
compared with the real one it stands in for.

Rows, host microseconds per call (median of `--rounds` rounds of `--calls` calls each, the
device synchronized between rounds, not between calls, as a step issues them):
  simulated_move, simulated_move_into: the simulated exchange's movement (bf16 rows, the
    payload `--rows` x `--dim`), issued only; simulated_move_wait, simulated_move_into_wait:
    issued and waited (the caller's stream ordered after it, no host wait on CUDA);
  nccl_all_to_all: `NcclExchange`'s all-to-all into a buffer on a one-rank group, issued and
    waited: the code path of a real group (torch.distributed's all_to_all_single with
    async_op, NCCL's enqueue), but with one peer, so a lower bound of a W-rank movement's
    host cost (NCCL plans a send and a receive per peer); with `--smoke`, gloo on CPU;
  pieces (CUDA only): spin_launch (`braid.ops.spin`, the simulation's stand-in kernel),
    event_create_record, copy_launch (the movement's device copy).
`simulated_over_nccl` is simulated_move_into_wait / nccl_all_to_all (both receive into a
buffer and are waited). On CUDA `device_us` gives each row's device time per call over the same
rounds: where it reaches the host time, the launch queue may have filled and the host waited
for the device, so the host figure is then an upper bound (lower `--calls`).
The result JSON records the command, device, versions and date.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_result  # noqa: E402

from braid.exchange import get_exchange  # noqa: E402
from braid.exchange.config import ExchangeConfig  # noqa: E402
from braid.exchange.nccl import NcclExchange  # noqa: E402


def host_us(fn, device: torch.device, calls: int, rounds: int) -> tuple[float, float | None]:
    """Median over rounds of the host time per call of `fn` (us), and on CUDA the device time
    per call over the same rounds (from the round's first launch to its last kernel's end)."""
    for _ in range(min(calls, 20)):  # warm-up: compiled kernels, allocator, NCCL setup
        fn()
    cuda = device.type == "cuda"
    host, dev = [], []
    for _ in range(rounds):
        if cuda:
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        host.append((time.perf_counter() - t) / calls * 1e6)
        if cuda:
            end.record()
            end.synchronize()
            dev.append(start.elapsed_time(end) / calls * 1e3)
    return round(statistics.median(host), 2), round(statistics.median(dev), 2) if cuda else None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="", help="JSON result file")
    ap.add_argument(
        "--smoke", action="store_true", help="CPU and gloo, its own tiny sizes, seconds"
    )
    ap.add_argument("--rows", type=int, default=4096, help="rows of one movement (4096)")
    ap.add_argument("--dim", type=int, default=2048, help="row width (2048)")
    ap.add_argument("--calls", type=int, default=50, help="calls per round (50)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (5)")
    args = ap.parse_args(argv)
    if args.smoke:
        device, backend = torch.device("cpu"), "gloo"
        args.rows, args.dim, args.calls, args.rounds = 64, 16, 20, 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit("exchange_host.py needs a CUDA GPU (or --smoke for the CPU check)")
        device, backend = torch.device("cuda", 0), "nccl"
        torch.cuda.set_device(device)
    dtype = torch.bfloat16
    x = torch.randn(args.rows, args.dim, device=device).to(dtype)
    out = torch.empty_like(x)
    split = [args.rows]
    calls, rounds = args.calls, args.rounds
    rows: dict[str, float] = {}
    device_us: dict[str, float] = {}

    def row(name: str, fn) -> None:
        rows[name], dev = host_us(fn, device, calls, rounds)
        if dev is not None:
            device_us[name] = dev

    # The simulated exchange, at its 4-rank defaults; on CPU a tiny latency (it sleeps there).
    cfg = ExchangeConfig(algorithm="simulated", simulate_latency_us=1 if args.smoke else 40)
    sim = get_exchange("simulated")(None, None, cfg)
    row("simulated_move", lambda: sim.move(x, split, split))
    row("simulated_move_into", lambda: sim.move_into(x, split, split, out))
    row("simulated_move_wait", lambda: sim.move(x, split, split).wait())
    row("simulated_move_into_wait", lambda: sim.move_into(x, split, split, out).wait())

    # NCCL's path on a one-rank group (`move` itself returns at once for one rank).
    with tempfile.TemporaryDirectory() as tmp:
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, store=store, rank=0, world_size=1, **kw)
        try:
            nccl = NcclExchange(dist.group.WORLD, dist.group.WORLD)
            row("nccl_all_to_all", lambda: nccl._all_to_all(x, split, split, out).wait())
        finally:
            dist.destroy_process_group()

    if device.type == "cuda":
        from braid.ops.spin import spin

        row("spin_launch", lambda: spin(1e-3))  # the current device, as the exchange calls it
        row("event_create_record", lambda: torch.cuda.Event(enable_timing=True).record())
        row("copy_launch", lambda: out.copy_(x))

    ref = rows["nccl_all_to_all"]
    result = {
        **environment(),
        "command": " ".join(
            [
                "PYTHONPATH=src python benchmarks/exchange_host.py",
                *(sys.argv[1:] if argv is None else argv),
            ]
        ),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "backend": backend,
        "smoke": args.smoke,
        "payload": {"rows": args.rows, "dim": args.dim, "dtype": str(dtype)},
        "calls": calls,
        "rounds": rounds,
        "host_us": rows,
        "device_us": device_us,
        "simulated_over_nccl": round(rows["simulated_move_into_wait"] / max(ref, 1e-9), 3),
    }
    for name, us in rows.items():
        dev = f"  (device {device_us[name]:9.2f} us)" if name in device_us else ""
        print(f"{name:>24}: {us:9.2f} us{dev}", flush=True)
    if args.out:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
