"""Tile sweep of the per-(group, column) fp8 quantiser (`braid.ops.fp8_triton`), one GPU.

Times, for each tile (rows x columns per step, warps, rows per program), the three calls that
dominate the Mixtral-like layer's fp8 quantisation: the up-projection's output gradient for its
fp8 dW ([65536, 28672] bf16, 8 groups), the SwiGLU output's saved codes for the down dW
([65536, 14336] e4m3 with row scales), and the up-projection weight's forward codes
([8, 4096, 28672] fp32, a scale per column). Every tile's codes and scales must equal the first
tile's bit for bit (`same`; tests/unit/test_fp8_cuda.py checks the kernels against the
reference quantisers); the fastest such tile is reported as `best`.

    PYTHONPATH=src python benchmarks/fp8_quant_tiles.py \
        --out benchmarks/results/fp8_quant_tiles_h200.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, time_cuda, write_result  # noqa: E402

from braid.ops import fp8_triton as ft  # noqa: E402
from braid.ops.fp8_gemm import padded_offsets  # noqa: E402

TILES = ",".join(  # the 19 tiles of the recorded sweep, `fp8_quant_tiles_h200.json`
    ["64x64x4x1024", "128x64x4x1024", "128x64x8x1024", "64x128x4x1024", "64x128x8x1024"]
    + ["128x128x8x1024", "32x128x4x1024", "128x32x4x1024", "64x64x4x256", "128x64x4x256"]
    + ["64x32x4x1024", "256x32x4x1024", "128x16x4x1024", "256x16x4x1024", "128x32x2x1024"]
    + ["256x32x8x1024", "128x32x4x2048", "256x32x4x2048", "512x16x4x1024"]
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/fp8_quant_tiles.json")
    p.add_argument("--tiles", default=TILES, help="rows x cols x warps x rows-per-program, ...")
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    tiles = [tile.split("x") for tile in args.tiles.split(",")]
    for tile in tiles:
        if len(tile) != 4 or not all(v.isdigit() and int(v) > 0 for v in tile):
            what = "x".join(tile)
            p.error(f"--tiles {what!r}: each tile is ROWSxCOLSxWARPSxSPLIT_ROWS, positive integers")
    if not (torch.cuda.is_available() and ft.available(torch.ones(1, device="cuda"))):
        p.error("needs an NVIDIA GPU with Triton's e4m3 casts (compute capability 8.9+)")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    E, R, D, F = 8, 65536, 4096, 14336
    g = torch.randn(R, 2 * F, device=dev, dtype=torch.bfloat16)
    hq = torch.randn(R, F, device=dev).to(torch.float8_e4m3fn)
    hs = torch.rand(R, 1, device=dev) + 0.5
    w = torch.randn(E, D, 2 * F, device=dev) * 0.02
    offs = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * (R // E)
    _, _, pend, width = padded_offsets(offs, R)
    calls = {
        "grad_groups_ms": lambda sr: ft.quantize_groups(g, offs, pend, width, split_rows=sr),
        "codes_groups_ms": lambda sr: ft.quantize_groups(hq, offs, pend, width, hs, split_rows=sr),
        "weight_cols_ms": lambda sr: ft.quantize_cols(w, split_rows=sr),
    }
    first, rows = None, []
    kept = ft.GROUP_ROWS, ft.GROUP_COLS, ft.GROUP_WARPS
    for br, bd, warps, split in ([int(v) for v in tile] for tile in tiles):
        ft.GROUP_ROWS, ft.GROUP_COLS, ft.GROUP_WARPS = br, bd, warps
        outs = [call(split) for call in calls.values()]
        first = first or outs
        same = all(
            torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])
            for a, b in zip(outs, first, strict=True)
        )
        del outs
        row = {"rows": br, "cols": bd, "warps": warps, "split_rows": split, "same": same}
        for name, call in calls.items():
            row[name] = round(time_cuda(lambda c=call, s=split: c(s), args.iters)["median_ms"], 3)
        row["total_ms"] = round(sum(row[n] for n in calls), 3)
        rows.append(row)
        print(row, flush=True)
    ft.GROUP_ROWS, ft.GROUP_COLS, ft.GROUP_WARPS = kept
    best = min((r for r in rows if r["same"]), key=lambda r: r["total_ms"])
    print("best", best)
    write_result(args.out, {"env": environment(), "sweep": rows, "best": best})


if __name__ == "__main__":
    main()
