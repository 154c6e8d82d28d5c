"""Attention kernels on one GPU: full causal SDPA, a sliding window through flex attention
(block mask) and through SDPA with a dense mask, forward + backward; then one MLA layer's
training step and its decoding step over the compressed cache, next to GQA's.

    PYTHONPATH=src python benchmarks/attention_bench.py --out benchmarks/results/attention_h100.json

Before timing, the flex-attention result is checked against the masked SDPA one (same inputs),
so a wrong block mask cannot produce a fast number.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from common import environment, time_cuda, write_result  # noqa: E402

from braid.model.attend import attend, flex_window_attention, window_mask  # noqa: E402
from braid.model.attention import Attention  # noqa: E402
from braid.model.config import ModelConfig  # noqa: E402
from braid.model.mla import MLA  # noqa: E402
from braid.model.rope import rope_table  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def kernels(B: int, T: int, H: int, K: int, Dh: int, window: int, iters: int) -> dict:
    dev, dt = DEV, torch.bfloat16 if DEV.type == "cuda" else torch.float32
    q = torch.randn(B, H, T, Dh, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(B, K, T, Dh, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(B, K, T, Dh, device=dev, dtype=dt, requires_grad=True)
    mask = window_mask(T, T, 0, window, dev)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():  # (flex attention has no CPU backward; --smoke checks it here)
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        flex = flex_window_attention(qd, kd, vd, None, window, compiled=DEV.type == "cuda")
        dense = sdpa(q, k, v, attn_mask=mask, enable_gqa=True)
    err = (flex.float() - dense.float()).abs().max().item()
    assert err < 2e-2, f"flex attention differs from masked SDPA by {err}"

    def fwd_bwd(fn):
        def step():
            fn().float().square().mean().backward()
            q.grad = k.grad = v.grad = None

        return time_cuda(step, iters=iters)

    return {
        "shape": {"B": B, "T": T, "H": H, "K": K, "Dh": Dh, "window": window},
        "flex_vs_masked_max_abs_err": err,
        "full_causal_sdpa": fwd_bwd(lambda: attend(q, k, v, scale=None)),
        "window_flex": fwd_bwd(lambda: attend(q, k, v, scale=None, window=window)),
        "window_masked_sdpa": fwd_bwd(lambda: sdpa(q, k, v, attn_mask=mask, enable_gqa=True)),
    }


def layers(B: int, T: int, iters: int) -> dict:
    """Moonlight-like shapes (dim 2048, 16 heads, MLA 512 + 64, nope 128, v 128) against GQA
    with the same heads at head_dim 128 and 4 kv heads."""
    dev = DEV
    mla_cfg = ModelConfig(
        dim=2048,
        n_heads=16,
        attention="mla",
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        max_seq_len=T + 64,
    )
    gqa_cfg = ModelConfig(dim=2048, n_heads=16, n_kv_heads=4, head_dim=128, max_seq_len=T + 64)
    out = {}
    for name, cfg, cls in (("mla", mla_cfg, MLA), ("gqa", gqa_cfg, Attention)):
        cfg.validate()
        layer = cls(cfg).to(dev)
        rope = rope_table(cfg).to(dev)
        x = torch.randn(B, T, cfg.dim, device=dev)

        def train_step(layer=layer, rope=rope, x=x):
            with torch.autocast(dev.type, torch.bfloat16):
                y = layer(x, rope[:T])
            y.float().square().mean().backward()

        cache = layer.new_cache(B, T + 1, torch.empty(0, device=dev, dtype=torch.bfloat16))
        with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16):
            layer(x, rope[:T], cache)
        x1 = torch.randn(B, 1, cfg.dim, device=dev)

        @torch.no_grad()
        def decode_step(layer=layer, rope=rope, cache=cache, x1=x1):
            cache.length = T  # re-decode position T over the filled cache
            with torch.autocast(dev.type, torch.bfloat16):
                layer(x1, rope[T : T + 1], cache)

        cache_bytes = sum(
            t.numel() * t.element_size()
            for t in vars(cache).values()
            if isinstance(t, torch.Tensor)
        )
        out[name] = {
            "train_fwd_bwd": time_cuda(train_step, iters=iters),
            "decode_step": time_cuda(decode_step, iters=iters),
            "cache_bytes_per_token": cache_bytes // (B * (T + 1)),
        }
    return {"B": B, "T": T, **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (runs on CPU too)")
    args = ap.parse_args()
    B, T, windows = (1, 64, (16,)) if args.smoke else (4, 4096, (512, 2048))
    result = {
        "environment": environment(),
        "kernels": [kernels(B, T, 32, 8, 128, w, args.iters) for w in windows],
        "layers": layers(B, T, args.iters),
    }
    write_result(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
