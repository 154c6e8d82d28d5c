"""On a GPU, a dropless training step of `braid train` (one process, fused AdamW) makes no
synchronizing CUDA call between its logging steps: benchmarks/sync_check.py runs the trainer
under `torch.cuda.set_sync_debug_mode("error")`, eager and with CUDA graphs. Skipped without
CUDA; the device gate's arithmetic is tested on the CPU (tests/unit/test_device_gate.py)."""

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


@pytest.mark.parametrize("extra", [[], ["--cuda-graphs"]], ids=["eager", "cuda_graphs"])
def test_dropless_step_never_syncs_between_logging_steps(tmp_path, extra):
    out = tmp_path / "sync.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "sync_check.py"),
        "--mode",
        "error",
        "--out",
        str(out),
        *extra,
    ]
    path = [str(ROOT / "src")] + [p for p in [os.environ.get("PYTHONPATH", "")] if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}  # keep what the caller had
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r = json.loads(out.read_text())
    assert r["ok"] and r["error"] is None and not r["syncs"]
    assert len(r["steps_clean"]) >= 4
