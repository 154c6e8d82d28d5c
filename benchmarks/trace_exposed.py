"""Exposed communication in a Chrome trace of one step, by exchange range.

Reads a torch.profiler Chrome trace (`benchmarks/overlap_sim.py --trace`, or a training run's
`overlap.trace_step`) and reports, for each exchange range of the overlap timeline
(`moe{i}/dispatch_a2a`, `moe{i}/combine_a2a_bwd`, ...; braid.overlap.timeline), how long the
exchange stream was busy while the compute stream had no kernel running: the device-side view
of exposed communication. The compute stream is the stream with the most kernel time; every
other stream's kernels, copies and memsets count as communication. Each communication event is
attributed to the innermost `*_a2a*` range (a `gpu_user_annotation`) that holds its start, else
to "other".

This is not the engine's own measure (`overlap.report`'s `exposed_ms` is the compute stream's
time inside `handle.wait()`): under the profiler the compute stream also idles while the host
launches, so this count is larger, but it says where in the step the exchange goes bare.

    python benchmarks/trace_exposed.py TRACE.json [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def _merge(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _covered(a: float, b: float, merged: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(b, y) - max(a, x)) for x, y in merged if x < b and y > a)


def exposed_by_range(trace: dict) -> dict:
    """{"compute_stream", "exposed_ms": {range: ms}, "total_ms", "comm_ms"} of one trace."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    device = [e for e in events if e.get("cat") in DEVICE_CATS and e.get("ph") == "X"]
    busy: dict = defaultdict(float)
    for e in device:
        busy[e["args"].get("stream")] += e["dur"]
    if not busy:
        return {"compute_stream": None, "exposed_ms": {}, "total_ms": 0.0, "comm_ms": 0.0}
    compute = max(busy, key=busy.get)
    merged = _merge(
        [(e["ts"], e["ts"] + e["dur"]) for e in device if e["args"].get("stream") == compute]
    )
    ranges = [
        (e["ts"], e["ts"] + e["dur"], e["name"])
        for e in events
        if e.get("cat") == "gpu_user_annotation" and "_a2a" in e.get("name", "")
    ]
    exposed: dict = defaultdict(float)
    comm = 0.0
    for e in device:
        if e["args"].get("stream") == compute:
            continue
        a, b = e["ts"], e["ts"] + e["dur"]
        comm += b - a
        holding = [r for r in ranges if r[0] <= a <= r[1]]
        name = min(holding, key=lambda r: r[1] - r[0])[2] if holding else "other"
        exposed[name] += (b - a) - _covered(a, b, merged)
    ms = {k: round(v / 1e3, 4) for k, v in sorted(exposed.items())}
    return {
        "compute_stream": compute,
        "exposed_ms": ms,
        "total_ms": round(sum(exposed.values()) / 1e3, 4),
        "comm_ms": round(comm / 1e3, 4),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", type=Path, help="a Chrome trace (JSON)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    try:
        trace = json.loads(args.trace.read_text())
    except (OSError, ValueError) as e:
        print(f"trace_exposed: cannot read {args.trace}: {e}", file=sys.stderr)
        return 2
    res = exposed_by_range(trace)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"compute stream {res['compute_stream']}; communication {res['comm_ms']:.3f} ms")
    for name, ms in res["exposed_ms"].items():
        print(f"  {name:32s} {ms:8.3f} ms exposed")
    print(f"  {'total':32s} {res['total_ms']:8.3f} ms exposed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
