"""The GPU benchmark's `--smoke` mode runs on 4 CPU/gloo ranks and reports every exchange
correct, so the script the lead runs on 4x H200 does not rot between GPU runs: the MoE layer is
timed with the overlap engine on (it deferred weight grads), every compressor has a row (bf16
too), the movement table has counts + move and move alone, and auto reports its choice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_exchange_bench_smoke_runs_and_reports_every_exchange_correct(tmp_path):
    out = tmp_path / "smoke.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=4",
        str(ROOT / "benchmarks" / "exchange_bench.py"),
        "--smoke",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["correctness"] == {n: "ok" for n in ("nccl", "hierarchical", "hierarchical-n2")}
    assert all(r["within_bound"] for r in result["codecs_on_device"].values())
    exchanges = ("nccl", "hierarchical", "hierarchical-n2")
    comps = ("none", "bf16", "int8", "fp8-row", "fp8", "fp8+combine")
    for ex in exchanges:
        for comp in comps:
            assert result["layer_errors"][ex][comp]["dw_deferred"] > 0, (ex, comp)
            assert result["moe"][f"{ex}+{comp}"]["ms"] > 0, (ex, comp)
        for row in result["move"][ex].values():
            assert row["ms"] > 0 and row["move_ms"] > 0
    assert result["moe_overlap"] == {"chunks": 2, "split_dw": True}
    assert result["moe"]["nccl+none"]["relative_to_nccl_none"] == 1.0
    assert result["moe_overlap_off"]["nccl+none"]["ms"] > 0
    auto = result["auto"]
    assert auto["seconds"]["symmetric"] == float("inf") and "symmetric" in auto["skipped"]
    assert auto["chose"] in ("nccl", "hierarchical")
    assert f"exchange auto: chose {auto['chose']} for {auto['rows']} rows" in proc.stdout
