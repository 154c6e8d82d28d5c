"""Where a chunked MoE layer's time goes: kernels of one forward + backward, by kind, for each
chunk count, with the exchange local (no movement cost: what chunking alone costs) and
simulated (4-rank traffic on a high-priority stream, as `overlap_sim.py --high-priority`).

    PYTHONPATH=src python benchmarks/chunk_profile.py --shape mixtral_8e_top2 --chunks 1,4,8 \
        --out benchmarks/results/chunk_profile_mixtral_h100.json
    PYTHONPATH=src python benchmarks/chunk_profile.py --smoke --out /tmp/c.json       # CPU

Per (exchange, C): the layer's median ms (CUDA events) and, from one profiled step, kernel ms
summed by kind (`step_profile.kind_of`; the simulated exchange's spin kernel apart as "spin")
with the costliest kernels. C = 1 is the plain path; C > 1 runs chunks of tokens (routed dW
joined where the kernel runs, `overlap.chunk_dw = "auto"`), without split_dw. Kernel sums of
streams that overlap can exceed the wall time. On CPU the rows are the profiler's operators.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from common import environment, time_cuda, write_result  # noqa: E402
from overlap_sim import SHAPES, SMOKE_SHAPES, layer_step, make_layer  # noqa: E402
from step_profile import kind_of  # noqa: E402

from braid.exchange import get_exchange  # noqa: E402
from braid.exchange.base import LocalExchange  # noqa: E402
from braid.exchange.config import ExchangeConfig  # noqa: E402
from braid.overlap.engine import LayerOverlap  # noqa: E402
from braid.overlap.streams import Clock, synchronize  # noqa: E402

EXCHANGES = ("local", "simulated")


def profile_once(step, device: torch.device, top: int) -> tuple[dict, list]:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        step()
        synchronize(device)
    kinds, names = Counter(), Counter()
    for e in prof.events():
        on_device = e.device_type == torch.autograd.DeviceType.CUDA
        if e.is_user_annotation or (device.type == "cuda") != on_device:
            continue
        ms = (e.device_time if on_device else e.self_cpu_time_total) / 1e3
        kinds["spin" if "spin" in e.name else kind_of(e.name)] += ms
        names[e.name[:120]] += ms
    by_kind = {k: round(v, 3) for k, v in kinds.most_common()}
    return by_kind, [{"name": n, "ms": round(v, 3)} for n, v in names.most_common(top)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="mixtral_8e_top2", help=", ".join(SHAPES))
    ap.add_argument("--chunks", default="1,4,8")
    ap.add_argument("--exchanges", default="local,simulated")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--smoke", action="store_true", help="CPU, a tiny shape, seconds")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    names = args.exchanges.split(",")
    if bad := [n for n in names if n not in EXCHANGES]:
        raise SystemExit(f"--exchanges: unknown {bad}; expected of {list(EXCHANGES)}")
    try:
        counts = [int(c) for c in args.chunks.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise SystemExit(f"--chunks {args.chunks!r}: expected a comma list of integers >= 1")
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        raise SystemExit("chunk_profile.py needs a GPU for its shapes; --smoke runs on CPU")
    device = torch.device("cuda" if cuda else "cpu")
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.shape not in shapes:
        shape = next(iter(shapes)) if args.smoke else None
        if shape is None:
            raise SystemExit(f"--shape {args.shape!r}: expected one of {', '.join(SHAPES)}")
        args.shape = shape
    tokens = 256 if args.smoke else args.tokens
    moe, x, g = make_layer(shapes[args.shape], tokens, device)
    dtype = torch.bfloat16 if cuda else torch.float32
    amp = torch.autocast(device.type, dtype=dtype, enabled=cuda)
    sim = ExchangeConfig(algorithm="simulated", simulate_ranks=4, high_priority=True)
    exchanges = {
        "local": LocalExchange,
        "simulated": lambda: get_exchange("simulated")(None, None, sim),
    }
    clock = Clock(device)

    def step() -> None:
        layer_step(moe, x, g, amp)

    result = {"env": environment(), "shape": args.shape, "tokens": tokens, "runs": []}
    for name in names:
        moe.dispatcher.exchange = exchanges[name]()
        for C in counts:
            moe.overlap = None if C == 1 else LayerOverlap(0, C, False, clock, chunk_by="tokens")
            ms = time_cuda(step, iters=args.iters, warmup=2)["median_ms"]
            by_kind, top = profile_once(step, device, args.top)
            row = {"exchange": name, "chunks": C, "median_ms": round(ms, 3), "kernel_ms": by_kind}
            result["runs"].append({**row, "top": top})
            print(row, flush=True)
            if args.out:
                write_result(args.out, result)
    moe.overlap = None


if __name__ == "__main__":
    main()
