"""Braid's layer spec inside Megatron-Core against Megatron's own MoE layer, on one GPU (ep=1).

1. equivalence: a small GPTModel (MoE in every layer, local spec, no Transformer Engine) built
   twice, with Megatron's MoE layer and with Braid's spec, on identical weights (mapped by
   `megatron_to_braid`); forward logits, loss and every gradient compared (max abs and relative
   diffs; Braid's grads mapped back to Megatron's names by `braid_to_megatron`), in bf16 and
   again in fp32 (to show how much of the bf16 difference is rounding);
2. timing: one MoE layer forward+backward at 32768 tokens, [seq, batch, hidden] bf16, the same
   router weights (identical routing), aux loss on in both, for the Mixtral-like (8e top-2,
   4096/14336) and fine-grained (64e top-8, 2048/1408) shapes: Megatron's MoELayer (alltoall
   dispatcher, SequentialMLP) against BraidMoEAdapter.
Both routers run in fp32 (moe_router_dtype="fp32"), so routing is the same up to GEMM rounding.
--smoke runs tiny shapes, on CPU where there is no GPU (see `megatron_on_cpu`).

    python benchmarks/megatron_spec.py --out benchmarks/results/megatron_spec_h200.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, time_cuda, write_result  # noqa: E402

SHAPES = {
    "mixtral_like": dict(E=8, k=2, H=4096, F=14336),
    "fine_grained": dict(E=64, k=8, H=2048, F=1408),
}
SMOKE_SHAPES = {"tiny": dict(E=4, k=2, H=32, F=16)}


def config(s: dict, num_layers: int = 1, heads: int = 16, dtype=torch.bfloat16, **kw):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=num_layers, hidden_size=s["H"], num_attention_heads=heads,
        ffn_hidden_size=s["F"], moe_ffn_hidden_size=s["F"], num_moe_experts=s["E"],
        moe_router_topk=s["k"], moe_grouped_gemm=False,
        # alltoall as in the anchors; its constructor needs CUDA, allgather builds on CPU
        moe_token_dispatcher_type="alltoall" if torch.cuda.is_available() else "allgather",
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        bf16=dtype == torch.bfloat16, params_dtype=dtype,
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2,
        moe_z_loss_coeff=1e-3, moe_router_dtype="fp32",
        use_cpu_initialization=not torch.cuda.is_available(),
        attention_dropout=0.0, hidden_dropout=0.0,  # no random masks: the two must compare
        **kw,
    )  # fmt: skip


def diffs(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.float(), b.float()
    d = (a - b).abs()
    return {"max_abs": d.max().item(), "rel": (d.norm() / b.norm().clamp(min=1e-30)).item()}


def worst(table: dict) -> dict:
    return {
        "max_abs": max(v["max_abs"] for v in table.values()),
        "rel": max(v["rel"] for v in table.values()),
    }


def equivalence(smoke: bool, dev: torch.device, dtype: torch.dtype) -> dict:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.module import Float16Module

    from braid.integrations.megatron import (
        braid_to_megatron,
        get_braid_layer_spec,
        megatron_to_braid,
    )

    s = dict(E=4, k=2, H=64, F=32) if smoke else dict(E=8, k=2, H=512, F=1024)
    layers, seq, batch, vocab = (2, 16, 2, 128) if smoke else (4, 512, 2, 1024)
    cfg = config(
        s, num_layers=layers, heads=4, dtype=dtype, moe_shared_expert_intermediate_size=s["F"]
    )
    kw = dict(config=cfg, vocab_size=vocab, max_sequence_length=seq)
    # bf16 as Megatron trains it: the model inside Float16Module (casts params and buffers).
    wrap = (lambda m: Float16Module(cfg, m)) if dtype == torch.bfloat16 else (lambda m: m)
    local = get_gpt_layer_local_spec(num_experts=s["E"])
    # Megatron's trainer moves the model to the GPU itself (embeddings are built on the host)
    theirs = wrap(GPTModel(transformer_layer_spec=local, **kw)).to(dev)
    ours = wrap(GPTModel(transformer_layer_spec=get_braid_layer_spec(cfg), **kw)).to(dev)
    ours.load_state_dict(megatron_to_braid(theirs.state_dict()), strict=True)
    out = {"shape": dict(s, layers=layers, seq=seq, batch=batch, vocab=vocab)}
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(dev)
    labels = torch.randint(0, vocab, (batch, seq), generator=g).to(dev)
    pos = torch.arange(seq, device=dev)[None].expand(batch, seq)
    mask = torch.ones(seq, seq, dtype=torch.bool, device=dev).triu(1)[None, None]
    res = {}
    for name, m in (("megatron", theirs), ("braid", ours)):
        logits = m(ids, pos, attention_mask=mask)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        res[name] = (logits.detach(), loss.detach(), grads)
    grads_b = braid_to_megatron(res["braid"][2])
    grads_m = res["megatron"][2]
    # A parameter without a grad on one side only (an expert no token reached) is listed.
    out["grads_on_one_side_only"] = sorted(set(grads_b) ^ set(grads_m))
    table = {n: diffs(grads_b[n], grads_m[n]) for n in grads_m if n in grads_b}
    moe = {n: v for n, v in table.items() if ".mlp." in n}
    out.update(
        logits=diffs(res["braid"][0], res["megatron"][0]),
        loss={"megatron": res["megatron"][1].item(), "braid": res["braid"][1].item()},
        grads_worst=worst(table),
        grads_worst_moe=worst(moe),
        grads_worst_other=worst({n: v for n, v in table.items() if n not in moe}),
        grads_by_kind={
            k: worst({n: v for n, v in table.items() if k in n})
            for k in ("router", "local_experts", "shared_experts", "self_attention", "embedding")
        },
    )
    return out


def layer_time(name: str, s: dict, tokens: int, dev: torch.device) -> dict:
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import build_module

    from braid.integrations.megatron import braid_mlp_spec, megatron_to_braid

    cfg = config(s)
    ours = build_module(braid_mlp_spec(cfg), config=cfg)
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(tokens // 8, 8, s["H"], generator=g).to(dev, torch.bfloat16)
    dy = torch.randn(tokens // 8, 8, s["H"], generator=g).to(dev, torch.bfloat16)
    x.requires_grad_(True)
    out = {}
    theirs = get_moe_module_spec(use_te=False, num_experts=s["E"], moe_grouped_gemm=False)(
        config=cfg
    )
    with torch.no_grad():  # one router for both: G ~ N(0, 1/H), identical routing
        w = torch.randn(s["E"], s["H"], generator=torch.Generator().manual_seed(7))
        theirs.router.weight.copy_(w / s["H"] ** 0.5)
    sd = megatron_to_braid({"mlp." + k: v for k, v in theirs.state_dict().items()})
    ours.load_state_dict({k[len("mlp.") :]: v for k, v in sd.items()}, strict=True)
    ours.to(dev)
    theirs.to(dev)
    for who, layer in (("megatron", theirs), ("braid", ours)):

        def step(layer=layer):
            y, _ = layer(x)
            y.backward(dy)

        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t = time_cuda(step, iters=3 if tokens < 1024 else 10, warmup=1 if tokens < 1024 else 3)
        if dev.type == "cuda":
            t["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        flops = 3 * 2 * tokens * s["k"] * 3 * s["H"] * s["F"]
        t["expert_tflops"] = round(flops / (t["median_ms"] / 1e3) / 1e12, 1)
        out[who] = t
        with torch.no_grad():
            out.setdefault("_y", []).append(layer(x)[0].float())
    ys = out.pop("_y")
    out["output_diff"] = diffs(ys[1], ys[0])
    out["braid_over_megatron"] = round(out["braid"]["median_ms"] / out["megatron"]["median_ms"], 3)
    del theirs, ours
    return out


def megatron_on_cpu() -> None:
    """--smoke without CUDA runs Megatron's own modules on CPU, as the CPU tests do: its router
    moves its weight to `torch.cuda.current_device()` on every forward, which here answers
    "cpu", and its attention forks the CUDA RNG state for dropout (off here), which forks
    nothing. The arithmetic is Megatron's own."""
    from megatron.core import tensor_parallel

    torch.cuda.current_device = lambda: "cpu"
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="where to write the JSON result")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (runs on CPU)")
    ap.add_argument("--tokens", type=int, default=32768)
    args = ap.parse_args()
    import megatron.core
    import megatron.core.transformer.moe.moe_utils as moe_utils
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    # megatron-core 0.16 without Transformer Engine reads `te_general_gemm` in its router GEMM
    # without defining it (0.19 defines it as None): Megatron's own layer needs the None.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        sys.exit("megatron_spec.py: the full run needs a GPU (use --smoke on a CPU machine)")
    if not cuda:
        megatron_on_cpu()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29571")
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(0)
    ps.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    if cuda:
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    result = environment()
    result["megatron_core"] = megatron.core.__version__
    # bf16 is the comparison asked for; fp32 shows what is left of it without bf16 rounding.
    result["equivalence"] = {
        str(dt).removeprefix("torch."): equivalence(args.smoke, dev, dt)
        for dt in (torch.bfloat16, torch.float32)
    }
    tokens = 64 if args.smoke else args.tokens
    result["tokens"] = tokens
    result["layer"] = {}
    failed = False
    for name, s in (SMOKE_SHAPES if args.smoke else SHAPES).items():
        try:  # one shape's failure (e.g. out of memory) is recorded; the others still run
            result["layer"][name] = layer_time(name, s, tokens, dev)
        except Exception as e:  # noqa: BLE001 - written to the result, and the exit code is 1
            result["layer"][name] = f"error: {type(e).__name__}: {str(e)[:300]}"
            failed = True
        print(name, result["layer"][name], flush=True)
        if cuda:
            torch.cuda.empty_cache()
    write_result(args.out, result)
    print(result["equivalence"], flush=True)
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
