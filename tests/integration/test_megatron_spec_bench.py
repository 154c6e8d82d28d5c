"""benchmarks/megatron_spec.py --smoke runs on CPU and writes its JSON (GPU runs are separate)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "megatron.core", reason="megatron-core not installed (pip install braid[megatron])"
)

ROOT = Path(__file__).resolve().parents[2]


def test_megatron_spec_benchmark_smoke(tmp_path):
    out = tmp_path / "r.json"
    env = dict(os.environ, MASTER_PORT="29587", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "benchmarks/megatron_spec.py"), "--smoke", "--out", str(out)]
    subprocess.run(cmd, check=True, timeout=300, env=env, capture_output=True)
    r = json.loads(out.read_text())
    assert r["command"].endswith(f"--smoke --out {out}") and r["megatron_core"]
    assert r["layer"]["tiny"]["braid"]["median_ms"] > 0
    if r.get("gpu") is None:
        assert "skipped" in r["equivalence"]["bfloat16"]["forward_backward"]
        assert "skipped" in r["layer"]["tiny"]["megatron"]
