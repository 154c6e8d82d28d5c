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
    payload `--rows` x `--dim`), issued only; simulated_move_wait: issued and waited (the
    caller's stream ordered after it, no host wait on CUDA);
  nccl_all_to_all: `NcclExchange`'s all-to-all on a one-rank group (the code path of a real
    group: torch.distributed's all_to_all_single with async_op, NCCL's enqueue), issued and
    waited; with `--smoke`, gloo on CPU;
  pieces (CUDA only): spin_launch (`braid.ops.spin`, the simulation's stand-in kernel),
    timing_event_record, copy_launch (the movement's device copy).
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


def host_us(fn, device: torch.device, calls: int, rounds: int) -> float:
    """Median over rounds of the host time per call of `fn` (us)."""
    for _ in range(min(calls, 20)):  # warm-up: compiled kernels, allocator, NCCL setup
        fn()
    per_round = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        per_round.append((time.perf_counter() - t) / calls * 1e6)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return round(statistics.median(per_round), 2)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="", help="JSON result file")
    ap.add_argument("--smoke", action="store_true", help="CPU and gloo, tiny rows, seconds")
    ap.add_argument("--rows", type=int, default=4096, help="rows of one movement (4096)")
    ap.add_argument("--dim", type=int, default=2048, help="row width (2048)")
    ap.add_argument("--calls", type=int, default=200, help="calls per round (200)")
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

    # The simulated exchange, at its 4-rank defaults; on CPU a tiny latency (it sleeps there).
    cfg = ExchangeConfig(algorithm="simulated", simulate_latency_us=1 if args.smoke else 40)
    sim = get_exchange("simulated")(None, None, cfg)
    rows["simulated_move"] = host_us(lambda: sim.move(x, split, split), device, calls, rounds)
    rows["simulated_move_into"] = host_us(
        lambda: sim.move_into(x, split, split, out), device, calls, rounds
    )
    rows["simulated_move_wait"] = host_us(
        lambda: sim.move(x, split, split).wait(), device, calls, rounds
    )

    # NCCL's path on a one-rank group (`move` itself returns at once for one rank).
    with tempfile.TemporaryDirectory() as tmp:
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, store=store, rank=0, world_size=1, **kw)
        try:
            nccl = NcclExchange(dist.group.WORLD, dist.group.WORLD)
            rows["nccl_all_to_all"] = host_us(
                lambda: nccl._all_to_all(x, split, split, out).wait(), device, calls, rounds
            )
        finally:
            dist.destroy_process_group()

    if device.type == "cuda":
        from braid.ops.spin import spin

        rows["spin_launch"] = host_us(lambda: spin(1e-3, device), device, calls, rounds)
        rows["timing_event_record"] = host_us(
            lambda: torch.cuda.Event(enable_timing=True).record(), device, calls, rounds
        )
        rows["copy_launch"] = host_us(lambda: out.copy_(x), device, calls, rounds)

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
        "simulated_move_wait_over_nccl": round(rows["simulated_move_wait"] / max(ref, 1e-9), 3),
    }
    for name, us in rows.items():
        print(f"{name:>22}: {us:9.2f} us", flush=True)
    if args.out:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
