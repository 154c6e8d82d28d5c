"""benchmarks/fp8_layer.py --smoke runs both parts on CPU, so the script run on an H200 does not
rot: every field is in the JSON and fp8 agrees with the reference within the stated bounds."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_fp8_layer_bench_smoke(tmp_path):
    out = tmp_path / "fp8.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "fp8_layer.py"), "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["complete"] and r["all_agree"] and r["command"].startswith("PYTHONPATH=src")
    assert r["date"] and r["torch"]
    assert set(r["layer"]) == {"smoke_8x_top2", "smoke_16x_top4"}
    for row in r["layer"].values():
        assert row["bf16_ms"] > 0 and row["fp8_ms"] > 0 and row["fp8_dw8_ms"] > 0
        assert row["speedup"] > 0 and row["speedup_dw8"] > 0
        for prec in ("fp8", "fp8_dw8"):
            errs = row[f"rel_err_{prec}_vs_bf16"]
            assert set(errs) == {"out", "dx", "dw13", "dw2"}
            assert all(1e-3 < v < 0.12 for v in errs.values())  # fp8 ran, and agrees
        assert row["rel_err_fp8_vs_bf16"]["dx"] == row["rel_err_fp8_dw8_vs_bf16"]["dx"]
    step = r["step"]
    assert step["bf16_tokens_per_s"] > 0 and step["fp8_tokens_per_s"] > 0 and step["agrees"]
    assert step["speedup_fp8"] > 0 and step["speedup_fp8_dw8"] > 0
    assert step["loss"]["fp8"] != step["loss"]["bf16"]


def test_fp8_convergence_script_smoke(tmp_path):
    from braid.data.prep import prepare

    (tmp_path / "text").mkdir()
    words = "the quick brown fox jumps over a lazy dog while experts route every token".split()
    (tmp_path / "text" / "a.txt").write_text(" ".join(words[i % 13] for i in range(6000)))
    prepare(
        [tmp_path / "text"], tmp_path / "data", vocab_size=300, val_fraction=0.1, progress=False
    )
    out = tmp_path / "conv.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "fp8_convergence.py"),
        "--smoke",
        "--runs",
        str(tmp_path / "runs"),
        "--out",
        str(out),
    ]
    part = subprocess.run(
        cmd + ["--stop-at", "3"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert part.returncode == 3 and "stopped at step 3" in part.stdout, part.stderr[-3000:]
    assert not out.exists()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stderr  # bf16 continued from its step-3 checkpoint
    r = json.loads(out.read_text())
    assert set(r["val_loss"]) == {"bf16", "fp8"} and r["within_1pct"]
    assert [s for s, _ in r["val_loss"]["fp8"]] == [0, 3, 6]
    assert (tmp_path / "conv.png").stat().st_size > 0
