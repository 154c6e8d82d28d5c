"""The dropless combine and its backward as Triton kernels (CUDA), one pass over memory each.

Same formulas as `braid.ops.permute.combine_forward_math` / `combine_backward_math` (fp32
products and sums, rounded once):
    out[n]          = sum_k gates[n, k] * y[pos[n, k]]
    dy[pos[n, k]]   = gates[n, k] * g[n]
    dgates[n, k]    = <y[pos[n, k]], g[n]>
One program per token: it reads the token's K expert rows (and g once, in the backward) and
writes its output row (its K gradient rows and K gate gradients). pos is the inverse of the
sorted order, so every row of dy is written exactly once, without atomics. torch.compile's
kernels for the same math gathered g per element of dy and reduced dgates in a second kernel
(about 5 and 3 ms for the fine-grained layer's 262144 rows of 2048 on an H100).
Shapes: N tokens, K copies per token, M = N * K rows, D columns.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: `available()` is False
    triton = None

MAX_BLOCK = 4096


def available(y: Tensor) -> bool:
    return triton is not None and y.is_cuda and y.dim() == 2 and y.shape[0] > 0


if triton is not None:

    @triton.jit
    def _combine_kernel(
        y_ptr, gates_ptr, pos_ptr, out_ptr, D, K: tl.constexpr, BLOCK: tl.constexpr
    ):
        n = tl.program_id(0).to(tl.int64)
        for c0 in range(0, D, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            mask = cols < D
            acc = tl.zeros([BLOCK], tl.float32)
            for k in tl.static_range(K):
                m = tl.load(pos_ptr + n * K + k).to(tl.int64)
                w = tl.load(gates_ptr + n * K + k).to(tl.float32)
                acc += tl.load(y_ptr + m * D + cols, mask=mask, other=0.0).to(tl.float32) * w
            tl.store(out_ptr + n * D + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _combine_backward_kernel(
        y_ptr, gates_ptr, pos_ptr, g_ptr, dy_ptr, dgates_ptr, D,
        K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        n = tl.program_id(0).to(tl.int64)
        ks = tl.arange(0, KP)
        dots = tl.zeros([KP], tl.float32)
        for c0 in range(0, D, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            mask = cols < D
            g = tl.load(g_ptr + n * D + cols, mask=mask, other=0.0).to(tl.float32)
            for k in tl.static_range(K):
                m = tl.load(pos_ptr + n * K + k).to(tl.int64)
                w = tl.load(gates_ptr + n * K + k).to(tl.float32)
                y = tl.load(y_ptr + m * D + cols, mask=mask, other=0.0).to(tl.float32)
                dots += tl.where(ks == k, tl.sum(y * g, 0), 0.0)
                tl.store(dy_ptr + m * D + cols, (w * g).to(dy_ptr.dtype.element_ty), mask=mask)
        out_t = dgates_ptr.dtype.element_ty
        tl.store(dgates_ptr + n * K + ks, dots.to(out_t), mask=ks < K)


def _block(D: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(D), MAX_BLOCK)
    return block, max(1, min(8, block // 256))


def forward(y_MD: Tensor, gates_NK: Tensor, pos_NK: Tensor) -> Tensor:
    """`combine_forward_math` (y contiguous, pos int64 [N, K])."""
    y, gates, pos = y_MD.contiguous(), gates_NK.contiguous(), pos_NK.contiguous()
    (N, K), D = pos.shape, y.shape[1]
    out = y.new_empty(N, D)
    block, warps = _block(D)
    with torch.cuda.device(y.device):
        _combine_kernel[(N,)](y, gates, pos, out, D, K=K, BLOCK=block, num_warps=warps)
    return out


def backward(y_MD: Tensor, gates_NK: Tensor, pos_NK: Tensor, g_ND: Tensor) -> tuple[Tensor, Tensor]:
    """`combine_backward_math`: (dy_MD in sorted order, dgates_NK)."""
    y, gates, pos, g = (t.contiguous() for t in (y_MD, gates_NK, pos_NK, g_ND))
    (N, K), D = pos.shape, y.shape[1]
    dy, dgates = torch.empty_like(y), torch.empty_like(gates)
    block, warps = _block(D)
    kp = triton.next_power_of_2(K)
    with torch.cuda.device(y.device):
        _combine_backward_kernel[(N,)](
            y, gates, pos, g, dy, dgates, D, K=K, KP=kp, BLOCK=block, num_warps=warps
        )
    return dy, dgates
