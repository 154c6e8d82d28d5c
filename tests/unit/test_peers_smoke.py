"""The peers benchmark's `--smoke` mode runs on the CPU, so the script the GPU run uses does not
rot: Braid's layer is timed at a tiny shape with the shared router weight and its whole step
with the preset reshaped as for torchtitan, the peers (absent or CUDA-only here) are reported
as skipped with a reason, versions and environment are recorded,
and `--profile` writes a key-averages table that contains the grouped GEMM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench_import import benchmark_module


@pytest.fixture(scope="module")
def peers():
    return benchmark_module("peers")


def test_smoke_times_braid_and_reports_absent_peers_as_skipped(peers, tmp_path):
    out, prof = tmp_path / "peers.json", tmp_path / "prof"
    peers.main(["--smoke", "--out", str(out), "--profile", str(prof)])
    r = json.loads(out.read_text())
    assert r["smoke"] and r["device"] == "cpu"
    assert r["env"]["torch"] and r["env"]["date"] and "peers.py" in r["env"]["command"]
    assert set(r["peer_versions"]) == {"torchtitan", "mcore"}
    row = r["layer"]["braid/tiny"]
    assert row["median_ms"] > 0 and row["load_max_over_mean"] >= 1.0
    for peer in ("torchtitan", "mcore"):
        assert r["layer"][f"{peer}/tiny"]["skipped"], peer  # a reason, not an empty string
    table = json.loads(Path(row["profile"]).read_text())
    assert any(e["name"] == "aten::_grouped_mm" for e in table["rows"])
    step = r["step"]
    assert step["shape"]["config"] == "tiny" and step["braid"]["tokens_per_s"] > 0
    assert step["torchtitan"]["skipped"]
    assert not peers.braid_failed(r)


def test_every_peer_layer_gets_the_same_router_weight(peers):
    import torch

    s = peers.SMOKE_SHAPES["tiny"]
    G_EH, x, _, load_E = peers.layer_inputs(s, torch.device("cpu"), torch.float32)
    m, forward = peers.LAYERS["braid"](s, torch.device("cpu"), torch.float32)
    w = peers.router_weight(m, s["E"], s["H"])
    assert w is m.router.weight
    with torch.no_grad():
        w.copy_(G_EH)
    chosen = m.router(x[0], lambda t: t).topk_idx_NK
    expect = (x[0] @ G_EH.T).topk(s["K"], dim=-1).indices.sort(dim=-1).values
    assert torch.equal(chosen, expect)
    assert torch.equal(torch.bincount(chosen.flatten(), minlength=s["E"]).float(), load_E)
