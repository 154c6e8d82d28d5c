"""On a GPU, benchmarks/exchange_host.py runs its CUDA paths (the simulated exchange's device
movement and spin kernel, NCCL on a one-rank group) and reports every row with its device time.
Skipped without CUDA; the CPU/gloo path is tests/unit/test_exchange_host_smoke.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_rows_are_all_there_with_device_times(tmp_path):
    out = tmp_path / "host.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "exchange_host.py"), "--out", str(out)]
    cmd += ["--calls", "5", "--rounds", "2", "--rows", "256", "--dim", "64"]
    path = [str(ROOT / "src")] + [p for p in [os.environ.get("PYTHONPATH", "")] if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r = json.loads(out.read_text())
    assert r["backend"] == "nccl" and r["device"] != "cpu" and not r["smoke"]
    names = {
        "simulated_move", "simulated_move_into", "simulated_move_wait",
        "simulated_move_into_wait", "nccl_all_to_all", "spin_launch", "event_create_record",
        "copy_launch",
    }  # fmt: skip
    assert set(r["host_us"]) == names and set(r["device_us"]) == names
    assert all(v > 0 for v in r["host_us"].values()), r["host_us"]
