"""The GPU benchmark's `--smoke` mode runs on 4 CPU/gloo ranks and reports every exchange
correct, so the script the lead runs on 4x H200 does not rot between GPU runs."""

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
    assert result["moe"]["nccl+none"]["relative_to_nccl_none"] == 1.0
    assert result["auto"]["seconds"]["symmetric"] == float("inf")
