"""Exchange conformance on 4 gloo ranks, every combination in ONE spawn (start-up is the cost).

Exchanges: nccl; hierarchical with node_size 1, 2 (chunks 1, 2, 3) and 4; the example plug-in
named by dotted path; auto. Checks:
  - raw `move` of random uneven splits (empty blocks, an idle rank, fp32/bf16/uint8, trailing
    dims) gives rows identical to `nccl`; so do `move_into`/`combine_into`, written into a
    buffer's rows and nothing around them, `nccl`'s by the collective itself (there once the
    movement completes, before `wait()`: no copy);
  - the expert-parallel MoE layer (dropless) with each exchange x compressor equals
    (a) the single-process layer with the same compression simulated straight-through
        (`straight_through`: compression is per row, so EP with compression must equal it), and
    (b) the uncompressed single-process layer, within the compressor's stated layer bound;
    for compressor none both are the same reference and the bound is 1e-6 (exact);
  - `choose_exchange` gives the same answer on every rank, skips `symmetric` off CUDA with its
    reason, and reports every candidate's time in its console line; with a slower candidate
    listed first (`SlowExchange`) and uneven row counts per rank, it picks `nccl` and times
    the largest rank's rows on every rank;
  - a whole model built as the trainer builds it (ep=4, 3 MoE layers): every MoE layer holds
    the SAME exchange object; `hierarchical` (two-stage, node_size 2) and `auto` shared across
    layers under the overlap engine (chunks=2, split_dw: several movements in flight) give the
    losses and gradients of `nccl` without overlap; `auto` decides once, rank 0 prints one
    `exchange auto: chose ...` line on stderr (other ranks none), and the trainer's watcher
    gets one record with every candidate's time; `hierarchical` (node_size 2) under
    `overlap.report` (also with chunks=auto and split_dw) reports every layer's exchange time;
  - overlap through the `Handle` contract alone, for every exchange above and the plug-in:
    with rank 0 starting each movement late, the other ranks drain queued dW inside the
    movements' windows, and the timeline's exchange time is nonzero.
"""

from __future__ import annotations

import pytest
import torch
from exchange_conformance import (
    COMPRESSIONS,
    EXACT,
    IN_PLACE,
    LAYER_BOUND,
    _compare,
    _completed,
    _ep,
    _layer_and_data,
    _overlap_window,
    _reference,
    _rel,
    _split_matrices,
)
from exchange_model_runs import MODELS, _model_run

from harness import run_ranks


def _worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from braid.exchange import EXCHANGES, get_exchange
    from braid.exchange.auto import choose_exchange
    from braid.exchange.config import ExchangeConfig

    torch.manual_seed(0)
    G = dist.group.WORLD
    get_exchange("nccl")  # registers the built-ins
    nccl = EXCHANGES.get("nccl")(G, G, ExchangeConfig())
    inner = {
        "nccl": nccl,
        "hier-n1": EXCHANGES.get("hierarchical")(G, G, ExchangeConfig(node_size=1)),
        "hier-n2c1": EXCHANGES.get("hierarchical")(
            G, G, ExchangeConfig(node_size=2, hierarchical_chunks=1)
        ),
        "hier-n2": EXCHANGES.get("hierarchical")(G, G, ExchangeConfig(node_size=2)),
        "hier-n2c3": EXCHANGES.get("hierarchical")(
            G, G, ExchangeConfig(node_size=2, hierarchical_chunks=3)
        ),
        "hier-n4": EXCHANGES.get("hierarchical")(G, G, ExchangeConfig(node_size=4)),
        "plugin": get_exchange("braid_plugin_example:P2PExchange")(G, G, ExchangeConfig()),
    }
    out: dict = {"move_mismatch": [], "layer": {}, "auto": None}

    # 1. raw moves: identical rows to nccl.
    for m, M in enumerate(_split_matrices(world)):
        send, recv = M[rank], [M[w][rank] for w in range(world)]
        for dtype, tail in ((torch.float32, (5,)), (torch.bfloat16, (3, 2)), (torch.uint8, (7,))):
            x = (torch.randn((sum(send),) + tail) * 100).to(dtype)
            want = nccl.move(x, send, recv).wait()
            for name, ex in inner.items():
                for op in (ex.move, ex.dispatch, ex.combine):
                    got = op(x, send, recv).wait()
                    if got.dtype != want.dtype or not torch.equal(got, want):
                        out["move_mismatch"].append((name, op.__name__, m, str(dtype)))
                for op in (ex.move_into, ex.combine_into):  # received into a buffer's rows
                    buf = torch.full((want.shape[0] + 2,) + tail, 7).to(dtype)
                    into = buf[1 : 1 + want.shape[0]]
                    h = op(x, send, recv, into)
                    early = _completed(h, into) if name in IN_PLACE else want
                    got = h.wait()
                    ok = got.data_ptr() == into.data_ptr() and torch.equal(into, want)
                    ok = ok and early is not None and torch.equal(early, want)
                    if not ok or buf[0].ne(7).any() or buf[-1].ne(7).any():  # nothing else
                        out["move_mismatch"].append((name, op.__name__, m, str(dtype)))

    # 2. the MoE layer, every exchange x compression, against both references.
    layer, x, gy = _layer_and_data(world)
    plain = _reference(layer, x, gy, "none")
    for comp, (cname, block, cc) in COMPRESSIONS.items():
        sim = plain if cname == "none" else _reference(layer, x, gy, comp)
        cfg = ExchangeConfig(compressor=cname, scale_block=block, compress_combine=cc)
        names = inner if comp in ("none", "fp8") else ("nccl", "hier-n1", "hier-n2", "hier-n4")
        for name in names:
            res = _ep(layer, inner[name], cfg, x, gy, rank, world)
            out["layer"][(name, comp)] = (
                _compare(res, sim, rank, world),
                _compare(res, plain, rank, world),
            )
    auto = get_exchange("auto")(G, G, ExchangeConfig(node_size=2))
    res = _ep(layer, auto, ExchangeConfig(), x, gy, rank, world)
    out["layer"][("auto", "none")] = (_compare(res, plain, rank, world),) * 2
    out["auto_inner"] = auto.choice.name

    # 3. choose_exchange agrees across ranks and skips symmetric off CUDA.
    choice = choose_exchange(
        ["nccl", "hierarchical", "symmetric"],
        G,
        G,
        ExchangeConfig(node_size=2),
        rows=64,
        dim=16,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    out["auto"] = choice.record()
    out["auto_line"] = choice.line()
    out["auto_built"] = type(choice.exchange).__name__
    out["plugin_calls"] = inner["plugin"].calls
    slow = "exchange_conformance:SlowExchange"  # listed first: the fastest wins, not the first
    get_exchange(slow)  # imported: `choose_exchange` builds only imported plug-ins
    rows = 16 + 8 * rank  # uneven: every rank times the largest (40 rows)
    args = (G, G, ExchangeConfig(), rows, 8, torch.float32, torch.device("cpu"))
    out["auto_fastest"] = choose_exchange([slow, "nccl"], *args).record()

    # 4. overlap through the Handle contract alone: dW in exchange windows, exchange time > 0.
    out["windows"] = {
        name: _overlap_window(layer, ex, x, gy, plain, rank, world)
        for name, ex in {**inner, "auto": auto}.items()
    }

    # 5. whole models: one exchange per model, shared by every MoE layer.
    out["models"] = {name: _model_run(name, rank, world) for name in MODELS}
    return out


@pytest.fixture(scope="module")
def per_rank() -> list[dict]:
    return run_ranks(_worker, 4)


def test_hierarchical_and_plugin_moves_identical_to_nccl(per_rank):
    for r in per_rank:
        assert r["move_mismatch"] == []


def test_moe_layer_matches_reference_for_every_exchange_and_compressor(per_rank):
    worst: dict = {}
    for r in per_rank:
        for key, (sim_err, plain_err) in r["layer"].items():
            a, b = worst.get(key, (0.0, 0.0))
            worst[key] = (max(a, sim_err), max(b, plain_err))
    for (ex, comp), (sim_err, plain_err) in sorted(worst.items()):
        print(f"{ex:>10} {comp:>13}: vs simulated {sim_err:.1e}, vs uncompressed {plain_err:.1e}")
    for (ex, comp), (sim_err, plain_err) in worst.items():
        assert sim_err <= EXACT, (ex, comp, sim_err)
        assert plain_err <= LAYER_BOUND[comp], (ex, comp, plain_err)
    assert {ex for ex, _ in worst} >= {"nccl", "hier-n1", "hier-n2", "hier-n4", "plugin", "auto"}


def test_plugin_by_dotted_path_is_used(per_rank):
    assert all(r["plugin_calls"] > 0 for r in per_rank)


def test_choose_exchange_agrees_on_every_rank_and_skips_symmetric(per_rank):
    first = per_rank[0]["auto"]
    assert first["chose"] in {"nccl", "hierarchical"}
    assert all(r["auto"] == first for r in per_rank)  # name, times and shape: every rank alike
    seconds = first["seconds"]
    assert seconds["symmetric"] == float("inf") and "needs CUDA" in first["skipped"]["symmetric"]
    assert 0 < seconds["nccl"] < float("inf") and 0 < seconds["hierarchical"] < float("inf")
    assert first["chose"] == min(seconds, key=seconds.get)
    assert first["rows"] == 64 and first["dim"] == 16
    # The chosen exchange comes back built (it is not built a second time).
    built = {"nccl": "NcclExchange", "hierarchical": "HierarchicalExchange"}[first["chose"]]
    assert per_rank[0]["auto_built"] == built
    line = per_rank[0]["auto_line"]
    assert line.startswith(f"exchange auto: chose {first['chose']} for 64 rows x 16 float32")
    for name in ("nccl", "hierarchical"):
        assert f"| {name} {1e3 * seconds[name]:.3f} ms" in line
    assert "| symmetric skipped (exchange.algorithm=symmetric needs CUDA" in line
    assert {r["auto_inner"] for r in per_rank} <= {"nccl", "hierarchical"}
    fastest = per_rank[0]["auto_fastest"]
    assert all(r["auto_fastest"] == fastest for r in per_rank)
    slow = fastest["seconds"]["exchange_conformance:SlowExchange"]
    assert fastest["chose"] == "nccl" and slow > fastest["seconds"]["nccl"], fastest
    assert fastest["rows"] == 16 + 8 * (len(per_rank) - 1)


def test_every_moe_layer_of_a_model_shares_one_exchange(per_rank):
    for r in per_rank:
        for name, m in r["models"].items():
            assert m["num_moe"] == 3 and m["exchanges"] == 1, name
    types = {name: m["exchange_type"] for name, m in per_rank[0]["models"].items()}
    assert types == {
        "nccl": "NcclExchange",
        "hier-n2": "HierarchicalExchange",
        "auto": "AutoExchange",
        "hier-n2-report": "HierarchicalExchange",
        "hier-n2-auto-report": "HierarchicalExchange",
    }
    assert per_rank[0]["models"]["hier-n2"]["overlap"] == [2, 2, 2]


def test_shared_exchange_under_overlap_matches_nccl_plain(per_rank):
    worst = {}
    for r in per_rank:
        ref = r["models"]["nccl"]
        for name in ("hier-n2", "auto", "hier-n2-report", "hier-n2-auto-report"):
            got = r["models"][name]
            errs = [abs(a - b) / abs(b) for a, b in zip(got["losses"], ref["losses"], strict=True)]
            errs += [_rel(got["grads"][n], g) for n, g in ref["grads"].items()]
            worst[name] = max(worst.get(name, 0.0), *errs)
    print("shared exchange + overlap vs nccl plain, max rel err:", worst)
    assert all(e <= 1e-5 for e in worst.values()), worst


def test_auto_decides_once_per_model_and_reports_choice_and_timings(per_rank):
    records = [r["models"]["auto"]["records"] for r in per_rank]
    assert all(len(rs) == 1 for rs in records)  # one choice for 3 layers x 2 passes, every rank
    rec, line, metrics = records[0][0]
    assert all(rs[0][0] == rec for rs in records)
    assert rec["chose"] in {"nccl", "hierarchical"} and rec["skipped"].keys() == {"symmetric"}
    printed = [r["models"]["auto"]["stderr"].splitlines() for r in per_rank]
    assert [ln for ln in printed[0] if ln.startswith("exchange auto:")] == [line]
    assert all(not any(ln.startswith("exchange auto:") for ln in p) for p in printed[1:])
    for name in ("nccl", "hierarchical"):
        assert f"| {name} {1e3 * rec['seconds'][name]:.3f} ms" in line
    assert metrics[f"exchange/auto_chose/{rec['chose']}"] == 1.0
    assert metrics["exchange/auto_ms/symmetric"] == float("inf")
    assert metrics["exchange/auto_ms/nccl"] == 1e3 * rec["seconds"]["nccl"]
    for m in per_rank[0]["models"].values():  # other exchanges report nothing
        if m["exchange_type"] != "AutoExchange":
            assert m["records"] == [] and "exchange auto:" not in m["stderr"]


def test_hierarchical_under_the_overlap_report_times_every_exchange(per_rank):
    """`hierarchical` (two stages) with `overlap.report` (also with chunks=auto and split_dw)
    reports a nonzero exchange time for every MoE layer on every rank."""
    for r in per_rank:
        for name in ("hier-n2-report", "hier-n2-auto-report"):
            metrics = r["models"][name]["metrics"]
            ex = {k: v for k, v in metrics.items() if k.startswith("overlap/exchange_ms/")}
            assert len(ex) == 3 and all(v > 0 for v in ex.values()), (name, metrics)
            assert all(metrics[k.replace("exchange_ms", "exposed_ms")] >= 0 for k in ex)


def test_every_exchange_and_the_plugin_get_dw_in_exchange_windows_and_a_timed_report(per_rank):
    """The overlap engine uses only the `Handle` contract (wait, done, elapsed_ms): with rank 0
    late, every other rank's movements are in flight when it drains, so queued dW runs inside
    the windows, and the timeline's exchange time is nonzero, for every built-in exchange that
    runs on CPU and for the plug-in written from docs/exchange.md."""
    names = set(per_rank[0]["windows"])
    assert names >= {"nccl", "hier-n1", "hier-n2", "hier-n4", "plugin", "auto"}
    for rank, r in enumerate(per_rank):
        for name, w in r["windows"].items():
            assert w["err"] <= EXACT, (rank, name, w)
            assert w["exchange_ms"] > 0, (rank, name, w)
    for name in names:  # rank 0 is the late one: its peers are ready, nothing to wait for.
        # Not every rank need find a window: a movement in which a rank exchanges no rows with
        # rank 0 completes without it, and `hierarchical` on gloo blocks inside `move` until
        # its stage 1 lands. So: dW ran in some window of some rank, for every exchange.
        drained = [r["windows"][name]["drained"] for r in per_rank[1:]]
        assert sum(drained) > 0, (name, drained)
