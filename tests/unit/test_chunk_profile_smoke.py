"""benchmarks/chunk_profile.py runs a tiny layer on CPU: one row per (exchange, C), the plain
path and chunks of tokens, each with its operators summed by kind."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_chunk_profile_runs_on_cpu(tmp_path):
    out = tmp_path / "c.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "chunk_profile.py"), "--smoke",
           "--chunks", "1,2", "--exchanges", "local,simulated", "--iters", "1",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    got = [(row["exchange"], row["chunks"]) for row in r["runs"]]
    assert got == [("local", 1), ("local", 2), ("simulated", 1), ("simulated", 2)]
    for row in r["runs"]:
        assert row["median_ms"] > 0 and row["kernel_ms"].get("gemm", 0) > 0, row
        assert row["top"] and all(t["ms"] >= 0 for t in row["top"])
    assert r["env"]["command"] and r["env"]["date"]
