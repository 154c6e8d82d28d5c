"""Braid against torchtitan and Megatron-Core on one GPU: same shapes, inputs, routing and timing.

    PYTHONPATH=src python benchmarks/peers.py --out benchmarks/results/peers_h200.json \
        [--profile benchmarks/results/peers_profile] [--parts layer,step,graphs]
    PYTHONPATH=src python benchmarks/peers.py --smoke --out /tmp/peers.json   # CPU, Braid alone

Parts:
- layer: one MoE layer, forward + backward, bf16, 32768 tokens, all experts local, at two shapes
  (Mixtral-like 8e top-2 4096/14336; fine-grained 64e top-8 2048/1408). Every layer gets the
  same router weight [E, H], so all route identical tokens to identical experts; the same input
  and output gradient; CUDA-event timing after warm-up, the median of --iters; peak memory.
  TFLOP/s count the expert GEMMs only: 3 passes x 2 x N x K x 3 x H x F.
- step: a whole-model forward + backward of Braid against torchtitan's Qwen3 decoder with MoE
  blocks of the same shape (`peer_models.titan_qwen3`), fp32 weights under bf16 autocast,
  each block compiled in both; FLOPs per token from `braid.info` for both (same shapes).
- graphs: Braid's `moonlet` step at batch 1 x 2048, compiled, with and without CUDA graphs
  (`train.cuda_graphs`), where launch overhead matters.
`--profile DIR` writes a torch.profiler key-averages table of Braid's layer (each shape) as JSON.
A peer that is absent or cannot run is recorded as skipped with the reason; the peers' versions
are recorded. `--smoke` runs the layer and step parts at tiny shapes on the CPU, where only Braid
runs and the peers report themselves skipped (the test of this script).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from common import environment, time_cuda, write_result  # noqa: E402
from peer_models import (  # noqa: E402
    LAYERS,
    PEER_PACKAGES,
    PeerMissing,
    braid_step_config,
    peer_version,
    router_weight,
    titan_qwen3,
)

SHAPES = {
    "mixtral_like": {"E": 8, "K": 2, "H": 4096, "F": 14336, "N": 32768},
    "fine_grained": {"E": 64, "K": 8, "H": 2048, "F": 1408, "N": 32768},
}
SMOKE_SHAPES = {"tiny": {"E": 4, "K": 2, "H": 32, "F": 48, "N": 64}}


def _peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def _reset(device: torch.device) -> None:
    """Free the last model: compiled graphs hold references to their modules."""
    gc.collect()
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _skip(e: BaseException) -> dict:
    why = str(e) if isinstance(e, PeerMissing) else f"{type(e).__name__}: {str(e)[:400]}"
    return {"skipped": why}


def layer_inputs(s: dict, device: torch.device, dtype: torch.dtype):
    """(router weight G [E, H], input x [1, N, H], output grad dy, expert loads under G)."""
    g = torch.Generator().manual_seed(7)
    G_EH = torch.randn(s["E"], s["H"], generator=g) / s["H"] ** 0.5
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, s["N"], s["H"], generator=g).to(device, dtype)
    dy = torch.randn(1, s["N"], s["H"], generator=g).to(device, dtype)
    top = (x[0].float() @ G_EH.to(device).T).topk(s["K"], dim=-1).indices
    load_E = torch.bincount(top.flatten(), minlength=s["E"]).float()
    return G_EH, x, dy, load_E


def _init(m: torch.nn.Module) -> None:
    """N(0, 0.02) weights drawn on the layer's device (experts' values do not change the
    timing; the router's, copied in after, decide the routing)."""
    with torch.no_grad():
        for i, p in enumerate(m.parameters()):
            g = torch.Generator(device=p.device).manual_seed(i)
            p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) * 0.02)


def bench_layer(
    peer: str,
    s: dict,
    device: torch.device,
    dtype: torch.dtype,
    iters: int,
    profile_dir: Path | None = None,
    tag: str = "",
) -> dict:
    G_EH, x0, dy, load_E = layer_inputs(s, device, dtype)
    _reset(device)
    m, forward = LAYERS[peer](s, device, dtype)
    _init(m)
    with torch.no_grad():
        w = router_weight(m, s["E"], s["H"])
        w.copy_(G_EH.to(w.device, w.dtype))
    x = x0.clone().requires_grad_(True)

    def step():
        forward(x).backward(dy)
        x.grad = None
        for p in m.parameters():
            p.grad = None

    t = time_cuda(step, iters=iters)
    ms = t["median_ms"]
    flops = 3 * 2 * s["N"] * s["K"] * 3 * s["H"] * s["F"]
    out = {
        **{k: round(v, 3) for k, v in t.items()},
        "tflops": round(flops / ms / 1e9, 1),
        "peak_gib": _peak_gib(device),
        "load_max_over_mean": round((load_E.max() / load_E.mean()).item(), 3),
    }
    if profile_dir is not None:
        out["profile"] = str(profile_layer(step, profile_dir / f"{peer}_{tag}.json"))
    return out  # the layer and its grads go with this frame; the next one resets the peak


def profile_layer(step, path: Path) -> Path:
    """torch.profiler key averages of a few steps, sorted by device (else CPU) time, as JSON."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    step()
    with profile(activities=acts) as prof:
        for _ in range(3):
            step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        dev_us = getattr(e, "device_time_total", 0.0) or getattr(e, "cuda_time_total", 0.0)
        rows.append(
            {
                "name": e.key,
                "calls": e.count,
                "device_us_per_step": round(dev_us / 3, 1),
                "self_device_us_per_step": round(
                    (getattr(e, "self_device_time_total", 0.0) or 0.0) / 3, 1
                ),
                "cpu_us_per_step": round(e.cpu_time_total / 3, 1),
            }
        )
    key = "self_device_us_per_step" if torch.cuda.is_available() else "cpu_us_per_step"
    rows.sort(key=lambda r: -r[key])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_result(path, {"env": environment(), "steps": 3, "sorted_by": key, "rows": rows})
    return path


def _lm_step(forward, vocab: int, batch: int, seq: int, device: torch.device, params):
    """A fwd+bwd closure on random tokens (CE on fp32 logits, bf16 autocast on CUDA)."""
    idx = torch.randint(
        0,
        vocab,
        (batch, seq + 1),
        device=device,
        generator=torch.Generator(device=device).manual_seed(3),
    )
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with amp:
            logits = forward(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        for p in params:
            p.grad = None

    return step


def bench_braid_model(cfg, batch: int, seq: int, device: torch.device, iters: int) -> dict:
    from braid.info import arithmetic
    from braid.parallel.mesh import ParallelContext
    from braid.train.model_setup import build_model

    _reset(device)
    model = build_model(cfg, ParallelContext(rank=0, world=1, local_rank=0, device=device))
    params = list(model.parameters())
    inner = _lm_step(lambda i: model(i).logits, cfg.model.vocab_size, batch, seq, device, params)

    def step():
        if cfg.train.cuda_graphs:  # a new step: graph outputs of the last one may be reused
            torch.compiler.cudagraph_mark_step_begin()
        inner()

    t = time_cuda(step, iters=iters, warmup=4 if cfg.train.compile else 2)
    return _step_numbers(t, arithmetic(cfg, seq).flops_per_token, batch, seq, device)


def bench_titan_model(cfg, batch: int, seq: int, device: torch.device, iters: int) -> dict:
    from braid.info import arithmetic

    if device.type != "cuda":
        raise PeerMissing("torchtitan's grouped experts need CUDA")
    _reset(device)
    model = titan_qwen3(cfg, device)
    if cfg.train.compile:
        for block in model.layers.values():
            block.compile()  # per block, in place, as Braid's train.compile does
    params = list(model.parameters())
    step = _lm_step(model, cfg.model.vocab_size, batch, seq, device, params)
    t = time_cuda(step, iters=iters, warmup=4 if cfg.train.compile else 2)
    out = _step_numbers(t, arithmetic(cfg, seq).flops_per_token, batch, seq, device)
    out["params"] = sum(p.numel() for p in params)
    return out


def _step_numbers(t: dict, flops_per_token: float, batch: int, seq: int, device) -> dict:
    tps = batch * seq / (t["median_ms"] / 1e3)
    return {
        **{k: round(v, 3) for k, v in t.items()},
        "tokens_per_s": round(tps),
        "tflops": round(tps * flops_per_token / 1e12, 1),
        "peak_gib": _peak_gib(device),
    }


def run_layers(args, result: dict, device, dtype, shapes, peers) -> None:
    for name, s in shapes.items():
        for peer in peers:
            key = f"{peer}/{name}"
            try:
                prof = Path(args.profile) if args.profile and peer == "braid" else None
                result["layer"][key] = bench_layer(peer, s, device, dtype, args.iters, prof, name)
            except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not fatal
                result["layer"][key] = _skip(e)
                traceback.print_exc()
            print(key, result["layer"][key], flush=True)
            write_result(args.out, result)
        ok = {
            p: r["median_ms"]
            for p in peers
            if "median_ms" in (r := result["layer"].get(f"{p}/{name}", {}))
        }
        if "braid" in ok and len(ok) > 1:
            best = min(v for p, v in ok.items() if p != "braid")
            result["layer"][f"speedup_vs_best_peer/{name}"] = round(best / ok["braid"], 3)


def run_step(args, result: dict, device) -> None:
    cfg = braid_step_config(args.step_config, args.seq, compile_=device.type == "cuda")
    result["step"]["shape"] = {
        "config": args.step_config,
        "batch": args.batch,
        "seq": args.seq,
        "overrides": "every layer MoE, softmax, no shared experts, "
        "no balancing loss, untied embeddings",
        "compile": cfg.train.compile,
    }
    for peer, fn in (("braid", bench_braid_model), ("torchtitan", bench_titan_model)):
        try:
            result["step"][peer] = fn(cfg, args.batch, args.seq, device, args.iters)
        except Exception as e:  # noqa: BLE001
            result["step"][peer] = _skip(e)
            traceback.print_exc()
        print("step", peer, result["step"][peer], flush=True)
        write_result(args.out, result)
    b, t = result["step"]["braid"], result["step"]["torchtitan"]
    if "tokens_per_s" in b and "tokens_per_s" in t:
        result["step"]["speedup_tokens_per_s"] = round(b["tokens_per_s"] / t["tokens_per_s"], 3)


def run_graphs(args, result: dict, device) -> None:
    from braid.config import load_config

    if device.type != "cuda":
        result["graphs"] = {"skipped": "CUDA graphs need a GPU"}
        return
    for graphs in (False, True):
        cfg = load_config(
            "moonlet",
            [
                "--train.compile=true",
                "--parallel.ep=1",
                f"--train.cuda_graphs={str(graphs).lower()}",
            ],
        )
        key = "cuda_graphs" if graphs else "compile"
        try:
            result["graphs"][key] = bench_braid_model(cfg, 1, 2048, device, args.iters)
        except Exception as e:  # noqa: BLE001
            result["graphs"][key] = _skip(e)
            traceback.print_exc()
        print("graphs", key, result["graphs"][key], flush=True)
        write_result(args.out, result)
    a, b = result["graphs"].get("compile", {}), result["graphs"].get("cuda_graphs", {})
    if "median_ms" in a and "median_ms" in b:
        result["graphs"]["speedup"] = round(a["median_ms"] / b["median_ms"], 3)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--parts", default="layer,step,graphs", help="comma list of layer,step,graphs")
    p.add_argument("--peers", default="braid,torchtitan,mcore")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--step-config", default="moonlet", help="Braid preset for the whole step")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--profile", default=None, help="directory for profiler tables (Braid layer)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Braid alone)")
    args = p.parse_args(argv)
    smoke = args.smoke
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16
    peers = args.peers.split(",")  # on the CPU every peer but Braid reports itself skipped
    parts = ["layer", "step"] if smoke else args.parts.split(",")
    shapes = SMOKE_SHAPES if smoke else SHAPES
    if smoke:  # the whole step of the `tiny` preset, reshaped as for torchtitan
        args.iters, args.step_config, args.batch, args.seq = 2, "tiny", 1, 32
    env = environment()
    if argv is not None:  # called in-process: record the arguments given, not the caller's
        env["command"] = " ".join(["python", "benchmarks/peers.py", *argv])
    result = {
        "env": env,
        "device": str(device),
        "smoke": smoke,
        "peer_versions": {p: peer_version(p) for p in PEER_PACKAGES},
        "timing": f"CUDA events, warm-up, median of {args.iters}",
        "shapes": shapes,
        "layer": {},
        "step": {},
        "graphs": {},
    }
    print("peers:", result["peer_versions"], flush=True)
    if "layer" in parts:
        run_layers(args, result, device, dtype, shapes, peers)
    if "step" in parts:
        run_step(args, result, device)
    if "graphs" in parts:
        run_graphs(args, result, device)
    write_result(args.out, result)
    print(json.dumps({k: result[k] for k in ("layer", "step", "graphs")}), flush=True)
    return result


def braid_failed(result: dict) -> bool:
    """Did any of Braid's own measurements fail (a peer that cannot run is no failure)?"""
    rows = [v for k, v in result["layer"].items() if k.startswith("braid/")]
    rows += [result["step"].get("braid", {})] + list(result["graphs"].values())
    return any(isinstance(r, dict) and "skipped" in r and "GPU" not in r["skipped"] for r in rows)


if __name__ == "__main__":
    sys.exit(1 if braid_failed(main()) else 0)
