"""`benchmarks/overlap_sim.py --smoke` runs on CPU and writes every field the one-GPU run
reports, so the script the lead runs on an H200 does not rot between GPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from braid.overlap.planner import CANDIDATES

ROOT = Path(__file__).resolve().parents[2]
MODES = {
    "off",
    "split_dw",
    "chunks2",
    "chunks4",
    "chunks8",
    "chunks2_split",
    "chunks4_split",
    "chunks8_split",
    "auto",
}
# split_dw = "all": the layer part has no attention
TRAIN_ONLY = {"split_all", "chunks2_all", "chunks4_all", "chunks8_all", "auto_all"}
# the A/B of overlap.chunk_dw: chunks of tokens whose routed dW is added per chunk
LAYER_ONLY = {"chunks4_split_per_chunk", "chunks8_split_per_chunk"}


def _smoke(*args: str) -> subprocess.CompletedProcess:
    """`overlap_sim.py --smoke ARGS` on CPU, one thread."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "overlap_sim.py"), "--smoke", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_overlap_sim_smoke_reports_every_mode_with_a_trace_and_a_profile(tmp_path):
    out, trace = tmp_path / "sim.json", tmp_path / "trace.json"
    proc = _smoke(
        "--out", str(out), "--trace", str(trace), "--trace-mode", "chunks2_split", "--profile"
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["complete"] and res["exchange"]["algorithm"] == "simulated"
    assert res["exchange"]["simulate_ranks"] == 4
    for key in ("command", "date", "torch", "device"):
        assert res[key], key
    groups = list(res["layer"].values()) + list(res["train"].values())
    assert len(res["layer"]) == 2 and set(res["train"]) == {"medium", "moonlet"}
    for g in groups:
        train = g in res["train"].values()
        only = TRAIN_ONLY if train else LAYER_ONLY
        assert set(g["modes"]) == MODES | {"auto_split"} | only
        assert g["exchange_alone_ms"] > 0
        for mode, row in g["modes"].items():
            assert row["median_ms"] > 0 and row["exchange_ms"] > 0, mode
            assert row["exposed_ms"] >= 0 and "slower_than_off" in row, mode
        assert g["modes"]["off"]["slower_than_off"] == 0.0
        assert g["best_mode"] in g["modes"] and "auto_vs_best" in g
        assert set(g["targets_met"]) == {
            "best_exposed_le_10pct",
            "no_mode_over_2pct_slower",
            "auto_within_3pct_of_best",
        }
    for g in res["layer"].values():
        assert set(g["planned_chunks"].values()) <= set(CANDIDATES)
    # chunk_dw: what chunks of tokens did with the routed dW (2 experts a rank in the
    # 8-expert shape: C = 4 and 8 cut tokens); with split_dw "auto" joins by bytes, without it
    # only where the kernel runs (not on a CPU: per chunk); chunks of experts: None
    rows = res["layer"]["smoke_8e_top2"]["modes"]
    for mode in LAYER_ONLY:
        assert rows[mode]["chunk_axis"] == "tokens" and rows[mode]["chunk_dw"] == "per_chunk"
    for mode in ("chunks4_split", "chunks8_split"):  # auto: joined, by bytes, at these sizes
        assert rows[mode]["chunk_dw"] == "joined", (mode, rows[mode]["chunk_dw"])
    assert rows["chunks4"]["chunk_dw"] == "per_chunk"
    for mode in ("off", "chunks2_split", "split_dw"):
        assert rows[mode]["chunk_dw"] is None, (mode, rows[mode]["chunk_dw"])
    for g in res["train"].values():  # what the chunks held: tokens without chunks
        for mode, row in g["modes"].items():
            axes = set(row["chunk_axes"])
            assert axes <= {"experts", "tokens"} and axes, (mode, row["chunk_axes"])
            if row["chunks"] == [1]:
                assert axes == {"tokens"}, (mode, row["chunk_axes"])
    for g in res["train"].values():  # blocks above an MoE layer deferred their dW into it
        for mode in TRAIN_ONLY:
            row = g["modes"][mode]
            assert row["split_dw"] == "all" and row["dense_dW_tasks"] > 0, (mode, row)
        assert g["modes"]["split_dw"]["split_dw"] == "experts"
    for g in res["train"].values():  # --profile: one profiled step per mode (CPU: no kernels)
        for mode, row in g["modes"].items():
            p = row["profile"]
            assert p["wall_ms"] >= p["host_ms"] > 0, (mode, p)
            assert p["kernel_ms"] == p["busy_ms"] == p["idle_ms"] == p["kernels"] == 0, (mode, p)
    assert res["train"]["medium"]["trace"]["mode"] == "chunks2_split"
    assert res["train"]["medium"]["trace"]["chunks"] == [2]
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert any(str(n).endswith("/dispatch_a2a") for n in names)


def test_overlap_sim_names_an_unknown_trace_mode(tmp_path):
    proc = _smoke(
        "--parts", "layer", "--trace", str(tmp_path / "t.json"), "--trace-mode", "split_all"
    )
    assert proc.returncode != 0
    assert "--trace-mode: unknown 'split_all'" in proc.stderr  # train-only mode, layer part


def test_chunks_of_experts_beyond_a_ranks_experts_are_skipped_and_named(tmp_path):
    # 4 simulated ranks: the 16-expert shape holds 4 a rank, the 8-expert one 2. With
    # --chunk-by experts a fixed C above that is refused on the real group, so it is left out.
    out = tmp_path / "e.json"
    proc = _smoke(
        "--out", str(out), "--parts", "layer", "--chunk-by", "experts",
        "--modes", "chunks2,chunks4,chunks8",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    layer = json.loads(out.read_text())["layer"]
    for shape, runs in (("smoke_16e_top4", {"chunks2", "chunks4"}), ("smoke_8e_top2", {"chunks2"})):
        g = layer[shape]
        assert set(g["modes"]) == {"off"} | runs, (shape, set(g["modes"]))
        assert set(g["skipped"]) == {"chunks2", "chunks4", "chunks8"} - runs, g["skipped"]
        assert all(g["modes"][m]["chunk_axis"] == "experts" for m in runs)
        assert all("experts per rank" in why for why in g["skipped"].values())
