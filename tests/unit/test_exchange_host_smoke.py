"""`benchmarks/exchange_host.py --smoke` runs on CPU (gloo) and reports every host-cost row, so
the script the GPU run uses does not rot. (A subprocess: it makes its own process group.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SIMULATED = {
    "simulated_move", "simulated_move_into", "simulated_move_wait", "simulated_move_into_wait"
}  # fmt: skip


def test_smoke_reports_the_host_cost_of_each_movement(tmp_path):
    out = tmp_path / "host.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "exchange_host.py"), "--smoke"]
    proc = subprocess.run(
        [*cmd, "--out", str(out)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["smoke"] and res["backend"] == "gloo" and res["device"] == "cpu"
    assert res["command"].endswith("exchange_host.py --smoke --out " + str(out))
    for key in ("date", "torch"):
        assert res[key], key
    rows = res["host_us"]
    assert set(rows) == SIMULATED | {"nccl_all_to_all"}
    assert all(us > 0 for us in rows.values()), rows
    assert res["device_us"] == {}  # CPU: no device time
    assert res["simulated_over_nccl"] == round(
        rows["simulated_move_into_wait"] / rows["nccl_all_to_all"], 3
    )
