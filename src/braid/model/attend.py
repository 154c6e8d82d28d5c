"""The attention kernel call shared by GQA and MLA: causal, optionally a sliding window, with
queries that may start after cached keys.

Which kernel:
  - full causal attention without a cache offset: SDPA with `is_causal` (fused, no mask); on
    CUDA `model.sdpa_backend` may name the backend to try first (`sdpa_order`; default:
    PyTorch's own order);
  - a sliding window on CUDA without a cache offset: flex attention compiled with a block mask
    (He et al. 2024, "FlexAttention"): fully masked blocks are skipped and no [T, S] mask
    exists. The block mask is built once per (length, window, device) and cached;
  - everything else (a window on CPU, where flex attention has no backward in torch 2.13, or
    queries after a KV cache, whose T is the few new tokens): SDPA with a boolean [T, S] mask,
    small for decoding and the only option SDPA offers for a window.

Shape legend: B batch, H query heads, K kv heads, T queries, S keys, Dk q/k size, Dv v size.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor


def sdpa_order(backend: str, device: torch.device) -> list | None:
    """SDPA backends in the order to try them for `model.sdpa_backend` on `device`: the named
    one first, then PyTorch's others; None keeps PyTorch's own order (on the CPU, "torch")."""
    from torch.nn.attention import SDPBackend

    if device.type != "cuda" or backend == "torch":
        return None
    first = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }[backend]
    rest = (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)  # fmt: skip
    return [first, *(b for b in rest if b != first)]


def causal_sdpa(q_BHTd: Tensor, k_BKSd: Tensor, v_BKSd: Tensor, scale: float | None,
                backend: str = "torch") -> Tensor:  # fmt: skip
    """Full causal SDPA, its backends tried in `sdpa_order(backend)`."""
    from torch.nn.attention import sdpa_kernel

    gqa = q_BHTd.shape[1] != k_BKSd.shape[1]
    order = sdpa_order(backend, q_BHTd.device)
    with nullcontext() if order is None else sdpa_kernel(order, set_priority=True):
        return F.scaled_dot_product_attention(
            q_BHTd, k_BKSd, v_BKSd, is_causal=True, scale=scale, enable_gqa=gqa
        )


def window_mask(T: int, S: int, q_start: int, window: int, device: torch.device) -> Tensor:
    """[T, S] bool, True where query (position q_start + t) may see key s: s <= q and, with a
    window, q - s < window (the query and the window-1 tokens before it)."""
    q_pos = torch.arange(q_start, q_start + T, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    ok = k_pos <= q_pos
    return ok & (q_pos - k_pos < window) if window > 0 else ok


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@torch.compiler.disable  # built eagerly and cached, also inside a compiled block
@functools.lru_cache(maxsize=32)
def _block_mask(T: int, window: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def sliding(b, h, q, kv):
        return (kv <= q) & (q - kv < window)

    return create_block_mask(sliding, None, None, T, T, device=device)


def flex_window_attention(
    q_BHTd: Tensor, k_BKSd: Tensor, v_BKSd: Tensor, scale: float | None, window: int, compiled: bool
) -> Tensor:
    """Sliding-window causal attention through flex attention (T == S)."""
    from torch.nn.attention.flex_attention import flex_attention

    # Inside a compiled block (train.compile) the compiler lowers the plain call itself.
    fn = _compiled_flex() if compiled and not torch.compiler.is_compiling() else flex_attention
    mask = _block_mask(q_BHTd.shape[2], window, str(q_BHTd.device))
    gqa = q_BHTd.shape[1] != k_BKSd.shape[1]
    return fn(q_BHTd, k_BKSd, v_BKSd, block_mask=mask, scale=scale, enable_gqa=gqa)


def attend(
    q_BHTd: Tensor,
    k_BKSd: Tensor,
    v_BKSd: Tensor,
    *,
    scale: float | None,
    window: int = 0,
    q_start: int = 0,
    flex: bool = True,
    backend: str = "torch",
) -> Tensor:
    """softmax(q k^T * scale + causal/window mask) v -> [B, H, T, Dv]; scale None means
    1/sqrt(Dk). Keys are positions 0..S-1 and queries q_start..q_start+T-1 (S = q_start + T).
    flex=False keeps a window on SDPA with a mask (MLA's absorbed decoding, whose q/k are
    kv_lora_rank + qk_rope_head_dim wide, beyond what flex attention's kernels are tuned for).
    `backend`: `model.sdpa_backend`, for full causal attention (`causal_sdpa`)."""
    T, S = q_BHTd.shape[2], k_BKSd.shape[2]
    gqa = q_BHTd.shape[1] != k_BKSd.shape[1]
    if q_start == 0 and (window == 0 or window >= T):
        return causal_sdpa(q_BHTd, k_BKSd, v_BKSd, scale, backend)
    if q_start == 0 and flex and q_BHTd.is_cuda:
        return flex_window_attention(q_BHTd, k_BKSd, v_BKSd, scale, window, compiled=True)
    mask = window_mask(T, S, q_start, window, q_BHTd.device)
    return F.scaled_dot_product_attention(
        q_BHTd, k_BKSd, v_BKSd, attn_mask=mask, scale=scale, enable_gqa=gqa
    )
