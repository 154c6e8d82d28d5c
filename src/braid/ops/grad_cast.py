"""A bf16 gradient into fp32 in one vectorized pass (cast-once grads, the routed experts' dW).

    into_fp32(None, g)            -> g as a new fp32 tensor    (g.float())
    into_fp32(acc, g)             -> acc += g, in place, fp32  (acc.add_(g))
    into_fp32(acc, g, add=False)  -> acc = g, in place         (acc.copy_(g))
    cast(g, dtype)                -> g.to(dtype), bf16 -> fp32 through into_fp32
The same bits as the torch expressions on the right: bf16 -> fp32 is exact and the sum rounds
once, in fp32. On CUDA, torch runs a dtype-converting copy or add through its unvectorized
element-wise kernel; on one H100 the bf16 -> fp32 copies of `moonlet`'s grads (7.2B weights)
took 24 ms a micro-step, about 1.8 TB/s (`benchmarks/results/step_profile_moonlet_cast_h100.json`).
The Triton kernel reads and writes 16-byte vectors where its pointers and the size are
16-byte multiples (as Triton specialises them at launch; otherwise narrower loads, same bits).
The torch expressions run instead on CPU, without Triton, while torch.compile traces, for
other dtypes, tensor subclasses, non-contiguous or empty tensors, an accumulator on another
device, and where autograd would record the conversion (create_graph).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch expressions
    triton = None

BLOCK = 4096


def available(g: Tensor, acc: Tensor | None = None) -> bool:
    """Whether the Triton kernel may convert `g` (into `acc`, when given)."""
    if torch.compiler.is_compiling() or triton is None:  # traced: the compiler fuses its own
        return False
    plain = type(g) is Tensor and g.is_cuda and g.dtype == torch.bfloat16
    if not plain or not g.is_contiguous() or g.numel() == 0:
        return False
    if torch.is_grad_enabled() and g.requires_grad:  # autograd would record the conversion
        return False
    return acc is None or (type(acc) is Tensor and acc.device == g.device and acc.is_contiguous())


if triton is not None:

    @triton.jit
    def _into_fp32_kernel(g_ptr, acc_ptr, n, ADD: tl.constexpr, BLOCK: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        if ADD:
            g = tl.load(acc_ptr + offs, mask=mask) + g
        tl.store(acc_ptr + offs, g, mask=mask)


def into_fp32(acc: Tensor | None, g: Tensor, add: bool = True) -> Tensor:
    """`g` (bf16) added into `acc` (fp32, in place; written over it with `add=False`), or a new
    fp32 copy of it when `acc` is None. Returns the fp32 tensor."""
    if acc is not None and (acc.shape != g.shape or acc.dtype != torch.float32):
        raise ValueError(
            f"into_fp32: accumulator {tuple(acc.shape)} {acc.dtype} for a grad "
            f"{tuple(g.shape)}; expected the grad's shape in float32"
        )
    if not available(g, acc):
        if acc is None:
            return g.to(torch.float32)
        return acc.add_(g) if add else acc.copy_(g)
    out = torch.empty(g.shape, dtype=torch.float32, device=g.device) if acc is None else acc
    n = g.numel()
    with torch.cuda.device(g.device):  # Triton launches on the current device
        _into_fp32_kernel[(triton.cdiv(n, BLOCK),)](
            g, out, n, ADD=acc is not None and add, BLOCK=BLOCK, num_warps=8
        )
    if acc is not None:
        torch.autograd.graph.increment_version(acc)  # written in place, as add_/copy_ do
    return out


def cast(g: Tensor, dtype: torch.dtype) -> Tensor:
    """g.to(dtype); bf16 -> fp32 in one vectorized pass (`into_fp32`)."""
    if dtype == torch.float32 and g.dtype == torch.bfloat16:
        return into_fp32(None, g)
    return g.to(dtype)
