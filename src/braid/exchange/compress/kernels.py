"""The quantisation arithmetic of `int8`, as pure functions (`fp8` uses `braid.ops.fp8`).

Shapes: x_RD rows (one scale per row) or x_RNB rows of N blocks of B elements (one scale per
block); p_RB packed rows (values' bytes, then fp32 scales). Each function is a few elementwise
ops and at most one reduction. Run eagerly that is several passes over the payload with fp32
temporaries, so on CUDA `fused` returns a `torch.compile`d version (dynamic shapes: the row
count changes every step) that fuses it into one or two memory-bound kernels. Per-row and
per-block variants are separate functions so that each compiled graph sees one rank of shape
(a size-1 block dimension would otherwise force a recompile per variant). The dequantisers
take the packed rows and view their value bytes inside the graph (no strided copy).
Compiled and eager results agree within the stated bounds, not always bit for bit (Triton's
fp32 division is not correctly rounded, so a value on a rounding boundary may take the
neighbouring code). Off CUDA, and for empty payloads, the functions run eagerly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

INT8_MAX = 127.0


def scales(x: Tensor, qmax: float) -> Tensor:
    """max|x| / qmax over the last dim (fp32, keepdim); an all-zero row/block keeps scale 1."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def quantize_int8_rows(x_RD: Tensor) -> tuple[Tensor, Tensor]:
    s_R1 = scales(x_RD, INT8_MAX)
    return torch.round(x_RD.float() / s_R1).to(torch.int8), s_R1


# q * s in fp32, rounded once to `dtype` (int8 values are exact in fp32).
def dequantize_int8_rows(p_RB: Tensor, dim: int, s_R1: Tensor, dtype: torch.dtype) -> Tensor:
    return (p_RB[:, :dim].view(torch.int8).float() * s_R1).to(dtype)


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=True)


def fused(fn: Callable, x: Tensor) -> Callable:
    """`fn` compiled for CUDA tensors with rows, else `fn` itself (eager)."""
    return _compiled(fn) if x.is_cuda and x.shape[0] > 0 else fn
