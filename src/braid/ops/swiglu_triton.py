"""SwiGLU forward and backward as hand-written Triton kernels (CUDA), one pass over memory each.

Same formulas as `braid.ops.swiglu.swiglu_forward_math` / `swiglu_backward_math` (fp32 inside,
rounded once to h's dtype):
    y     = silu(gate) * up                          s = sigmoid(gate)
    dgate = dy * up * s * (1 + gate * (1 - s))        dup = dy * gate * s
Each program takes one row and BLOCK columns of both halves: the forward reads gate and up once
and writes y; the backward reads gate, up and dy once and writes both halves of dh in place.
torch.compile's kernel for the same math builds dh with a `cat`, which made every output element
re-derive its half and ran at about a third of the memory bandwidth on an H100 (12.3 ms for the
Mixtral-like layer's backward, [65536, 2 x 14336] bf16, where one pass moves 9.4 GB:
benchmarks/results/peers_profile_h100/braid_mixtral_like.json).
Shapes: R rows, F expert hidden size; h [R, 2F] and dy [R, F], contiguous.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: `available()` is False
    triton = None

BLOCK = 1024


def available(h: Tensor) -> bool:
    return triton is not None and h.is_cuda and h.dim() == 2 and h.shape[0] > 0


if triton is not None:

    @triton.jit
    def _forward_kernel(h_ptr, y_ptr, F, nblk, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        row = (pid // nblk).to(tl.int64)
        cols = (pid % nblk) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < F
        h_row = h_ptr + row * 2 * F
        gate = tl.load(h_row + cols, mask=mask).to(tl.float32)
        up = tl.load(h_row + F + cols, mask=mask).to(tl.float32)
        y = gate * tl.sigmoid(gate) * up
        tl.store(y_ptr + row * F + cols, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_kernel(h_ptr, dy_ptr, dh_ptr, F, nblk, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        row = (pid // nblk).to(tl.int64)
        cols = (pid % nblk) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < F
        h_row, dh_row = h_ptr + row * 2 * F, dh_ptr + row * 2 * F
        gate = tl.load(h_row + cols, mask=mask).to(tl.float32)
        up = tl.load(h_row + F + cols, mask=mask).to(tl.float32)
        dy = tl.load(dy_ptr + row * F + cols, mask=mask).to(tl.float32)
        s = tl.sigmoid(gate)
        dgate = dy * up * s * (1 + gate * (1 - s))
        dup = dy * gate * s
        out_t = dh_ptr.dtype.element_ty
        tl.store(dh_row + cols, dgate.to(out_t), mask=mask)
        tl.store(dh_row + F + cols, dup.to(out_t), mask=mask)


def forward(h_RF2: Tensor) -> Tensor:
    h = h_RF2.contiguous()
    R, F = h.shape[0], h.shape[1] // 2
    y = h.new_empty(R, F)
    nblk = triton.cdiv(F, BLOCK)
    with torch.cuda.device(h.device):
        _forward_kernel[(R * nblk,)](h, y, F, nblk, BLOCK=BLOCK, num_warps=4)
    return y


def backward(h_RF2: Tensor, dy_RF: Tensor) -> Tensor:
    h, dy = h_RF2.contiguous(), dy_RF.contiguous()
    R, F = h.shape[0], h.shape[1] // 2
    dh = torch.empty_like(h)
    nblk = triton.cdiv(F, BLOCK)
    with torch.cuda.device(h.device):
        _backward_kernel[(R * nblk,)](h, dy, dh, F, nblk, BLOCK=BLOCK, num_warps=4)
    return dh
