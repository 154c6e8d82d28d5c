"""benchmarks/megatron_spec.py --smoke on CPU: whole-model comparison and layer timing both run."""

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
    # Whole GPTModels, Megatron's MoE layer against Braid's: fp32 agrees to rounding, bf16 to
    # bf16's; the same grads exist on both sides.
    fp32, bf16 = r["equivalence"]["float32"], r["equivalence"]["bfloat16"]
    assert fp32["grads_on_one_side_only"] == [] == bf16["grads_on_one_side_only"]
    assert fp32["logits"]["rel"] < 1e-5 and fp32["grads_worst"]["rel"] < 1e-5, fp32
    assert bf16["logits"]["rel"] < 5e-2 and bf16["grads_worst"]["rel"] < 5e-2, bf16
    layer = r["layer"]["tiny"]
    assert layer["megatron"]["median_ms"] > 0 and layer["braid"]["median_ms"] > 0
    assert layer["output_diff"]["rel"] < 5e-2
