"""float8 e4m3 quantisation with dynamic scales: one scale per row (or per 1x128 block).

Recipe (the "rowwise" recipe of torchao's float8 training and of DeepSeek-V3's 1x128 tiles):
    s = 2^ceil(log2(max|x_row| / 448))   (fp32; 448 is the largest e4m3 value; zero rows: s=1)
    q = e4m3(x / s)                      (round to nearest even; |x / s| <= 448, no saturation)
    x ~= q * s
Scales are powers of two (as torchao's rowwise recipe rounds them): x / s and q * s are then
exact in fp32, so the only rounding is the cast to e4m3, the fused (compiled) and eager
quantisers agree bit for bit, and so do a quantisation before and after an exchange. The cost
is at most one bit of headroom: the row's absmax lands in (224, 448].
A GEMM y = x @ w then runs on q_x and q_w and multiplies each output element by s_x[row] *
s_w[col] in its epilogue (`torch._scaled_mm`, `torch._scaled_grouped_mm`), so the scales must
run along the GEMM's reduction dimension: rows of the left operand, columns of the right one.
`quantize` scales over the last dim, `quantize_cols` over the second-to-last and returns the
values transposed (contiguous along the reduction dim, the layout the fp8 kernels want).

Error bound per element (e4m3 keeps 3 mantissa bits; subnormal spacing 2^-9 in scaled units):
    |q * s - x| <= 2^-4 |x| + 2^-10 s.

Fusion: eagerly, amax, scale and cast are several passes over the tensor with fp32
temporaries (1.9-6.7 ms per GEMM operand at 32768x4096 on an H200, which eats most of the fp8
GEMM's gain). On CUDA `quantize` and `quantize_cols` run as Triton kernels
(`braid.ops.fp8_triton`: one pass per row, or two passes per column block), the others
`torch.compile`d (dynamic shapes), which fuses each into one reduction kernel plus one
elementwise kernel, reading x twice and writing 1 byte per element; off CUDA they run eagerly
(the CPU emulation mode of `fp8_gemm`). Inside a compiled region they are traced into the
surrounding graph.

Shapes: R rows, D reduction dim, leading dims (experts) allowed everywhere.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from braid.ops import fp8_triton

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK = 128  # DeepSeek-V3's tile width for blockwise activation scales


def pow2_ceil(r: Tensor) -> Tensor:
    """The smallest power of two >= r, for positive normal fp32 r (exact: integer bit tricks)."""
    bits = r.view(torch.int32)
    return ((bits + 0x7FFFFF) & 0x7F800000).view(torch.float32)


def _scales(amax: Tensor) -> Tensor:
    amax = amax.float()
    ok = amax > 2.0**-100  # zero rows (and denormal dust) keep scale 1: their codes are 0
    return torch.where(ok, pow2_ceil(torch.where(ok, amax, 1.0) / E4M3_MAX), 1.0)


def quantize_ref(x: Tensor) -> tuple[Tensor, Tensor]:
    """(q, s): q = e4m3(x / s) with s = max|x| / 448 over the last dim (s keeps that dim as 1)."""
    s = _scales(x.abs().amax(dim=-1, keepdim=True))
    return (x.float() / s).to(E4M3), s


def quantize_cols_ref(x: Tensor) -> tuple[Tensor, Tensor]:
    """Scales over dim -2: x [..., K, N] -> q [..., N, K] (transposed, contiguous) and
    s [..., N, 1]."""
    s = _scales(x.abs().amax(dim=-2, keepdim=True))  # [..., 1, N]
    q = (x.float() / s).to(E4M3)
    return q.transpose(-2, -1).contiguous(), s.transpose(-2, -1)


def quantize_blocks_ref(x_RD: Tensor, block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """1x`block` tiles along the last dim (D % block == 0): q [R, D], s [R, D / block]."""
    R, D = x_RD.shape
    q, s = quantize_ref(x_RD.reshape(R, D // block, block))
    return q.reshape(R, D), s.squeeze(-1)


def quantize_groups_ref(
    x_RD: Tensor, gid_R: Tensor, dest_R: Tensor, num_groups: int, width: int
) -> tuple[Tensor, Tensor]:
    """Scales per (group, column) over the group's rows, codes transposed and spread out:
    q [D, width] with row r's codes in column dest[r] (other columns 0), s [G, D].
    This is the operand layout of the 2d-2d scaled grouped GEMM (groups along the reduction)."""
    R, D = x_RD.shape
    a = x_RD.abs().float()
    amax_GD = a.new_zeros(num_groups, D).scatter_reduce(
        0, gid_R[:, None].expand(R, D), a, "amax", include_self=True
    )
    s_GD = _scales(amax_GD)
    q_RD = (x_RD.float() / s_GD.index_select(0, gid_R)).to(E4M3).view(torch.uint8)
    q_DW = x_RD.new_zeros(D, width, dtype=torch.uint8).index_copy(1, dest_R, q_RD.t())
    return q_DW.view(E4M3), s_GD


def quantize_groups(
    x_RD: Tensor, gid_R: Tensor, dest_R: Tensor, num_groups: int, width: int
) -> tuple[Tensor, Tensor]:
    """`quantize_groups_ref`, fused on CUDA."""
    if x_RD.is_cuda and x_RD.numel() > 0 and not torch.compiler.is_compiling():
        return _compiled(quantize_groups_ref)(x_RD, gid_R, dest_R, num_groups, width)
    return quantize_groups_ref(x_RD, gid_R, dest_R, num_groups, width)


def dequantize(q: Tensor, s: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """q * s in fp32 (exact: e4m3 values and their products with fp32 scales), then `dtype`."""
    return (q.float() * s).to(dtype)


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=True)


def _run(fn: Callable, x: Tensor) -> tuple[Tensor, Tensor]:
    if x.is_cuda and x.numel() > 0 and not torch.compiler.is_compiling():
        # A plain tensor of fixed rank: parameters, grad flags and ranks would each be one
        # more compiled variant, and the compiler gives up after a few (then runs eagerly).
        return _compiled(fn)(x.detach())
    return fn(x)


def quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """`quantize_ref`, fused on CUDA: one pass by `fp8_triton.quantize_rows` where Triton is,
    else compiled."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if fp8_triton.available(x2) and not torch.compiler.is_compiling():
        q, s = fp8_triton.quantize_rows(x2.detach())
    else:
        q, s = _run(quantize_ref, x2)
    return q.view(*lead, x.shape[-1]), s.view(*lead, 1)


def quantize_cols(x: Tensor) -> tuple[Tensor, Tensor]:
    """`quantize_cols_ref`, fused on CUDA (the transpose is folded into the cast's store): by
    `fp8_triton.quantize_cols` where Triton is, else compiled."""
    if fp8_triton.available(x) and not torch.compiler.is_compiling():
        return fp8_triton.quantize_cols(x.detach())
    *lead, K, N = x.shape
    q, s = _run(quantize_cols_ref, x.reshape(-1, K, N))
    return q.view(*lead, N, K), s.view(*lead, N, 1)


def quantize_blocks(x_RD: Tensor) -> tuple[Tensor, Tensor]:
    """`quantize_blocks_ref` with 128-wide tiles, fused on CUDA."""
    return _run(quantize_blocks_ref, x_RD)


def bound(x: Tensor, s: Tensor) -> Tensor:
    """Elementwise worst case of |dequantize(quantize(x)) - x| for scales `s` (broadcastable)."""
    return x.float().abs() * 2.0**-4 + s * 2.0**-10
