"""benchmarks/wgrad_kernel.py needs a CUDA GPU with Triton: elsewhere it stops with one line
saying so, before writing anything (the kernel's own checks run in tests/gpu)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is what a CPU machine sees")
def test_the_kernel_benchmark_refuses_without_a_gpu(tmp_path):
    out = tmp_path / "r.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "wgrad_kernel.py"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "wgrad_kernel: needs a CUDA GPU with Triton (the kernel has no other backend)"
    )
    assert not out.exists()
