"""Exchanges and compressors on one host: correctness against `nccl` first, then speed.

    PYTHONPATH=src torchrun --nproc_per_node=4 benchmarks/exchange_bench.py --out x.json
    OMP_NUM_THREADS=1 PYTHONPATH=src torchrun --nproc_per_node=4 \
        benchmarks/exchange_bench.py --smoke --out /tmp/x.json   # CPU/gloo, tiny sizes

Exchanges: nccl; hierarchical with the default node size (one node here: one all-to-all) and
with node_size=2 (2 "nodes" of 2 GPUs: exercises the two-stage pipeline over NVLink only);
symmetric (CUDA). Compressions: none, bf16, int8, fp8 per row, fp8 block 128, fp8 + combine.
Phases:
  1. correctness: raw `move` of random uneven splits (bf16, fp32, packed uint8 rows) identical
     to nccl, also with two movements in flight; a small fp32 MoE layer per exchange x
     compressor, run with the overlap engine on as timed in 3, equal to the plain layer over
     nccl with the same compressor (rel <= 1e-6) and, for compressors, within the stated bound
     of nccl+none; symmetric with a too-small fixed capacity raises the BraidError on every
     rank. An exchange that fails is not timed.
  2. movement: payloads of 1-256 MiB per rank of bf16 rows (dim 4096), uniform random splits;
     median time (slowest rank) of what a dispatch pays, `exchange_counts` (with the host read
     of the counts) + `move` ("ms", and the bandwidths from it), and of `move` alone
     ("move_ms"): the count exchange is NCCL's for every built-in exchange, while
     `hierarchical` and `symmetric` also pay their own counts round inside `move`. The 1 MiB
     time is the latency.
  3. MoE layer forward+backward (fine-grained: 64 experts, top-8, dim 2048, expert ffn 1408,
     32768 tokens per rank, bf16) per exchange x compressor with the overlap engine on (a
     `braid.overlap.engine.LayerOverlap` installed as `braid.overlap.session` does:
     chunks=2, split_dw=true), relative to nccl+none (overlap on) = 1.0, plus the plain
     nccl+none layer (overlap off) on the same scale; the compressors' encode/decode time on
     that layer's dispatch payload; and the `auto` choice at one chunk's dispatch shape.
     (On this bf16 layer the bf16 compressor passes rows unchanged: it narrows fp32 rows only.)
Results: JSON with the command, GPU, torch/NCCL versions and date (rank 0 writes it).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
for _k, _v in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ.setdefault(_k, _v)  # NVLink multicast stays off (before any group exists)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import environment, time_cuda, write_result  # noqa: E402

from braid.errors import BraidError  # noqa: E402
from braid.exchange import EXCHANGES, get_exchange  # noqa: E402
from braid.exchange.auto import choose_exchange  # noqa: E402
from braid.exchange.compress import get_compressor, with_compressor  # noqa: E402
from braid.exchange.config import ExchangeConfig  # noqa: E402
from braid.overlap.engine import LayerOverlap  # noqa: E402
from braid.overlap.streams import Clock  # noqa: E402

COMPRESSIONS = {  # label -> [exchange] overrides
    "none": {},
    "bf16": {"compressor": "bf16"},
    "int8": {"compressor": "int8"},
    "fp8-row": {"compressor": "fp8", "scale_block": 0},
    "fp8": {"compressor": "fp8", "scale_block": 128},
    "fp8+combine": {"compressor": "fp8", "scale_block": 128, "compress_combine": True},
}
LAYER_BOUND = {  # as tests/exchange/test_exchange_ranks.py
    "none": 1e-6,
    "bf16": 1e-2,
    "int8": 3e-2,
    "fp8-row": 1e-1,
    "fp8": 1e-1,
    "fp8+combine": 1e-1,
}
OVERLAP = {"chunks": 2, "split_dw": True}  # the overlap engine of phase 3 (and its check)


def build_exchanges(G, cuda: bool) -> dict:
    get_exchange("nccl")  # registers the built-ins
    specs = {
        "nccl": ("nccl", {}),
        "hierarchical": ("hierarchical", {}),
        "hierarchical-n2": ("hierarchical", {"node_size": 2}),
    }
    if cuda:
        specs["symmetric"] = ("symmetric", {})
    out = {}
    for label, (name, kw) in specs.items():
        if kw.get("node_size", 1) > dist.get_world_size():
            continue
        out[label] = EXCHANGES.get(name)(G, G, ExchangeConfig(algorithm=name, **kw))
    return out


def split_matrix(W: int, rows: int, seed: int, sparse: bool = False) -> list[list[int]]:
    """Rows of each rank spread over destinations uniformly at random (same matrix everywhere)."""
    g = torch.Generator().manual_seed(seed)
    dest = torch.randint(0, W, (W, rows), generator=g)
    M = torch.stack([torch.bincount(d, minlength=W) for d in dest])
    if sparse:
        M[torch.rand(W, W, generator=g) < 0.4] = 0
    return M.tolist()


def check_moves(exchanges: dict, dim: int, rows: int, dev) -> dict:
    W, me = dist.get_world_size(), dist.get_rank()
    bad: dict[str, list] = {k: [] for k in exchanges}
    for seed, sparse in ((1, False), (2, True), (3, True)):
        M = split_matrix(W, rows, seed, sparse)
        send, recv = M[me], [M[w][me] for w in range(W)]
        for dtype in (torch.bfloat16, torch.float32, torch.uint8):
            x = (torch.randn(sum(send), dim, device=dev) * 50).to(dtype)
            x2 = (torch.randn(sum(recv), dim, device=dev) * 50).to(dtype)
            want = exchanges["nccl"].move(x, send, recv).wait()
            want2 = exchanges["nccl"].move(x2, recv, send).wait()
            for name, ex in exchanges.items():
                for op in (ex.move, ex.dispatch, ex.combine):
                    if not torch.equal(op(x, send, recv).wait(), want):
                        bad[name].append(f"{op.__name__} seed={seed} {dtype}")
                # Two movements in flight at once (a movement and its reverse, as a layer's
                # backward overlapping another's): the first's buffers must survive the second.
                h1, h2 = ex.move(x, send, recv), ex.move(x2, recv, send)
                if not torch.equal(h1.wait(), want) or not torch.equal(h2.wait(), want2):
                    bad[name].append(f"two in flight seed={seed} {dtype}")
    return bad


def check_codecs(dev) -> dict:
    """Each compressor on this device (fused kernels on CUDA) meets its stated bound, and how
    many packed bytes differ from the CPU's eager encoding (boundary roundings may)."""
    x = torch.randn(1000, 2048, dtype=torch.bfloat16) * torch.logspace(-4, 4, 1000)[:, None]
    res = {}
    for comp, kw in COMPRESSIONS.items():
        c = get_compressor(kw.get("compressor", "none"))(ExchangeConfig(**kw))
        p_dev = c.encode(x.to(dev))
        y = c.decode(p_dev, 2048, x.dtype).cpu()
        within = bool(((y.float() - x.float()).abs() <= c.bound(x) * (1 + 1e-5)).all())
        diff = (p_dev.cpu() != c.encode(x)).float().mean().item()
        res[comp] = {"within_bound": within, "bytes_differing_from_cpu": diff}
    return res


def check_symmetric_overflow(G, dev) -> str:
    W = dist.get_world_size()
    ex = EXCHANGES.get("symmetric")(G, G, ExchangeConfig(symmetric_capacity=8))
    send = [16] * W
    try:
        ex.move(torch.zeros(16 * W, 64, device=dev), send, send).wait()
    except BraidError as e:
        return f"ok: {e}"
    return "FAILED: no error for 16*W rows into capacity 8"


def moe_layer(E: int, K: int, D: int, F: int, dtype, dev, seed: int = 0):
    from braid.model.config import ModelConfig
    from braid.moe.config import MoEConfig
    from braid.moe.layer import MoE

    torch.manual_seed(seed)
    layer = MoE(ModelConfig(dim=D), MoEConfig(num_experts=E, top_k=K, expert_hidden=F))
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * D**-0.5)
    return layer.to(device=dev, dtype=dtype)


def ep_layer(layer, inner, comp: str, overlap: bool = False):
    """This rank's experts of `layer` over `inner` with compression `comp`; with `overlap`, the
    overlap engine installed as `OverlapSession.install` does (OVERLAP: chunks, split_dw)."""
    ep = copy.deepcopy(layer)
    ep.experts.shard(dist.get_rank(), dist.get_world_size())
    ep.dispatcher.exchange = with_compressor(inner, ExchangeConfig(**COMPRESSIONS[comp]))
    if overlap:
        dev = next(ep.parameters()).device
        ep.overlap = LayerOverlap(0, OVERLAP["chunks"], OVERLAP["split_dw"], Clock(dev))
    return ep


def fwd_bwd(layer, x, gy) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    out, _ = layer(x[None])
    (out[0] * gy).sum().backward()
    if layer.overlap is not None:
        layer.overlap.queue.flush()  # as the trainer does before the optimizer step
    return out[0].detach(), x.grad


def check_layers(exchanges: dict, dev, tokens: int) -> dict:
    """fp32 layer with overlap on (as timed): every exchange x compression vs the plain layer
    over nccl with the same compression, and vs the plain nccl layer without compression."""
    layer = moe_layer(16, 4, 256, 128, torch.float32, dev)
    x = torch.randn(tokens, 256, device=dev)
    gy = torch.randn(tokens, 256, device=dev)
    res: dict[str, dict] = {}
    for comp in COMPRESSIONS:
        want = fwd_bwd(ep_layer(layer, exchanges["nccl"], comp), x, gy)
        if comp == "none":
            plain = want
        for name, ex in exchanges.items():
            ep = ep_layer(layer, ex, comp, overlap=True)
            got = fwd_bwd(ep, x, gy)
            same = max(_rel(a, b) for a, b in zip(got, want, strict=True))
            vs_none = max(_rel(a, b) for a, b in zip(got, plain, strict=True))
            res.setdefault(name, {})[comp] = {
                "vs_nccl_same": same,
                "vs_none": vs_none,
                "dw_deferred": ep.overlap.queue.num_run,  # > 0: the overlap engine ran
            }
    return res


def _rel(a, b) -> float:
    t = torch.tensor([float((a - b).float().norm()), float(b.float().norm())], device=a.device)
    dist.all_reduce(t)  # over all ranks' parts
    return float(t[0] / t[1].clamp(min=1e-30))


def slowest(ms: float, dev) -> float:
    t = torch.tensor([ms], dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def bench_moves(
    exchanges: dict, sizes_mib: list[float], dim: int, local_experts: int, dev, iters: int
) -> dict:
    """Per exchange and payload: counts + move ("ms", bandwidths from it) and move alone."""
    W, me = dist.get_world_size(), dist.get_rank()
    out: dict[str, dict] = {k: {} for k in exchanges}
    for mib in sizes_mib:
        rows = max(1, int(mib * 2**20) // (dim * 2))
        M = split_matrix(W, rows, seed=int(mib * 1000))
        send, recv = M[me], [M[w][me] for w in range(W)]
        x = torch.randn(rows, dim, device=dev, dtype=torch.bfloat16)
        # The dispatcher's [W, L] count matrix (every row to local expert 0: sizes are what
        # matter), read on the host as the dispatcher does before it can move rows.
        counts_WL = torch.zeros(W, local_experts, dtype=torch.long, device=dev)
        counts_WL[:, 0] = torch.tensor(send, device=dev)
        nbytes = rows * dim * 2
        for name, ex in exchanges.items():

            def dispatch(ex=ex, x=x, s=send, r=recv, c=counts_WL) -> None:
                ex.exchange_counts(c).tolist()
                ex.move(x, s, r).wait()

            ms = slowest(time_cuda(dispatch, iters, 3)["median_ms"], dev)
            move = time_cuda(lambda ex=ex, x=x, s=send, r=recv: ex.move(x, s, r).wait(), iters, 3)
            algbw = nbytes / (ms / 1e3) / 1e9
            out[name][f"{mib:g}MiB"] = {
                "ms": round(ms, 4),
                "move_ms": round(slowest(move["median_ms"], dev), 4),
                "algbw_GBps": _sig(algbw),
                "busbw_GBps": _sig(algbw * (W - 1) / W),
            }
    return out


def bench_codecs(rows: int, dim: int, dtype, dev, iters: int) -> dict:
    """Encode and decode time of each compressor on one rank's dispatch payload."""
    x = torch.randn(rows, dim, device=dev, dtype=dtype)
    out = {}
    for comp, kw in COMPRESSIONS.items():
        if comp.endswith("+combine") or comp == "none":
            continue
        c = get_compressor(kw["compressor"])(ExchangeConfig(**kw))
        p = c.encode(x)
        enc = time_cuda(lambda c=c: c.encode(x), iters, 2)["median_ms"]
        dec = time_cuda(lambda c=c, p=p: c.decode(p, dim, dtype), iters, 2)["median_ms"]
        out[comp] = {
            "encode_ms": round(enc, 3),
            "decode_ms": round(dec, 3),
            "wire_bytes_per_row": c.wire_bytes(dim, dtype),
            "payload_bytes_per_row": dim * x.element_size(),
        }
    return out


def _sig(v: float) -> float:
    return float(f"{v:.4g}")


def bench_layers(
    exchanges: dict, comps: list, shape: dict, dtype, dev, iters: int
) -> tuple[dict, dict]:
    """Forward+backward ms of the layer with the overlap engine on, per exchange x compression,
    and of the plain nccl+none layer (overlap off); both relative to nccl+none with overlap."""
    E, K, D, F, N = (shape[k] for k in ("experts", "top_k", "dim", "ffn", "tokens"))
    layer = moe_layer(E, K, D, F, dtype, dev)
    x = torch.randn(N, D, device=dev, dtype=dtype)
    gy = torch.randn(N, D, device=dev, dtype=dtype)

    def time_layer(ep) -> dict:
        def step():
            fwd_bwd(ep, x, gy)
            ep.zero_grad(set_to_none=True)

        return {"ms": round(slowest(time_cuda(step, iters=iters, warmup=2)["median_ms"], dev), 3)}

    res: dict[str, dict] = {}
    plain: dict[str, dict] = {}
    if not exchanges or "none" not in comps:
        return res, plain
    for comp in comps:
        for name, ex in exchanges.items():
            res[f"{name}+{comp}"] = time_layer(ep_layer(layer, ex, comp, overlap=True))
    plain["nccl+none"] = time_layer(ep_layer(layer, exchanges["nccl"], "none"))
    base = res["nccl+none"]["ms"]
    for v in (*res.values(), *plain.values()):
        v["relative_to_nccl_none"] = round(v["ms"] / base, 3)
    return res, plain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="", help="JSON result path (rank 0 writes it)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU/gloo")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    G, W = dist.group.WORLD, dist.get_world_size()
    torch.manual_seed(1234 + dist.get_rank())
    if args.smoke:
        dim, sizes, iters, layer_iters = 64, [1 / 64, 1 / 16], 3, 2
        shape = {"experts": 8, "top_k": 2, "dim": 64, "ffn": 32, "tokens": 256}
        dtype = torch.float32
    else:
        dim, sizes, iters, layer_iters = 4096, [1, 4, 16, 64, 256], 10, 5
        shape = {"experts": 64, "top_k": 8, "dim": 2048, "ffn": 1408, "tokens": 32768}
        dtype = torch.bfloat16
    exchanges = build_exchanges(G, cuda)
    result = {
        **environment(),
        "launcher": f"torchrun --nproc_per_node={W}",
        "world": W,
        "exchanges": list(exchanges),
        "compressions": COMPRESSIONS,
    }

    # 1. correctness first; failing exchanges are reported and not timed.
    bad = check_moves(exchanges, dim=dim if not args.smoke else 8, rows=512, dev=dev)
    layers = check_layers(exchanges, dev, tokens=128 if args.smoke else 1024)
    for name, per in layers.items():
        for comp, e in per.items():
            if e["vs_nccl_same"] > 1e-6 or e["vs_none"] > LAYER_BOUND[comp]:
                bad[name].append(f"layer {comp}: {e}")
    result["codecs_on_device"] = check_codecs(dev)
    comps = [c for c, r in result["codecs_on_device"].items() if r["within_bound"]]
    result["correctness"] = {n: ("ok" if not b else b) for n, b in bad.items()}
    result["layer_errors"] = layers
    if cuda:
        result["symmetric_overflow"] = check_symmetric_overflow(G, dev)
    timed = {n: ex for n, ex in exchanges.items() if not bad[n]}
    if "nccl" not in timed or "none" not in comps:  # no baseline: report correctness only
        timed = {}
    if dist.get_rank() == 0:
        print("correctness:", result["correctness"], result["codecs_on_device"], flush=True)

    # 2. movement bandwidth and latency (counts + move, and move alone).
    result["move"] = bench_moves(timed, sizes, dim, shape["experts"] // W, dev, iters)
    # 3. the MoE layer with overlap on, and what auto would pick at one chunk's dispatch shape.
    result["moe_shape"] = {**shape, "dtype": str(dtype)}
    result["moe_overlap"] = OVERLAP
    result["moe"], result["moe_overlap_off"] = bench_layers(
        timed, comps, shape, dtype, dev, layer_iters
    )
    result["codecs"] = bench_codecs(
        shape["tokens"] * shape["top_k"], shape["dim"], dtype, dev, layer_iters
    )
    choice = choose_exchange(
        ["nccl", "hierarchical", "symmetric"],
        G,
        G,
        ExchangeConfig(),
        shape["tokens"] * shape["top_k"] // OVERLAP["chunks"],
        shape["dim"],
        dtype,
        dev,
    )
    result["auto"] = choice.record()
    if dist.get_rank() == 0:
        print(choice.line(), flush=True)
        for k in ("move", "moe", "moe_overlap_off", "codecs"):
            print(k, result[k], flush=True)
        if args.out:
            write_result(args.out, result)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
