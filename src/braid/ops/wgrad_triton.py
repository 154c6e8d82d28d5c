"""The routed experts' weight gradient over one or several chunks' rows, as one Triton grouped
GEMM that reads each chunk's operands where they lie and writes the fp32 grad.

    dW[e] = sum over chunks c of  x_c[rows of e]^T @ g_c[rows of e]
    x_c [R_c, D], g_c [R_c, F] bf16 (rows grouped by expert at offs_c); dW [E, D, F] fp32

Why: the joined dW of chunks of tokens (`braid.overlap.joined_experts`) otherwise gathers every
chunk's operands expert-major (each operand read and written once: about 13 GB for the
Mixtral-like layer at 32768 tokens) so that one `F.grouped_mm` sees each expert's rows in one
block, and that GEMM writes dW in bf16 (its CUDA kernel takes no other output dtype), which a
second pass converts into the fp32 grad. Here each program's reduction loop walks expert e's
rows chunk by chunk, straight from the chunks' tensors (their addresses in a small device
table), and stores its fp32 accumulators as they are: into a new grad, or added into the
existing one in its epilogue (`acc`: Megatron's gradient-accumulation fusion). The result is
the fp32 sum of the same bf16 products, not rounded to bf16 on the way.

Each program computes one [BLOCK_D, BLOCK_F] tile of one expert's dW; tiles are visited in
groups of GROUP_D along D so that neighbouring programs share g's columns in L2. Row counts
come from the device offsets (no host sync); an expert with no rows gets zeros, or is left as
it is when adding. Rows are 64-bit indexed.
CUDA sm90+ with Triton only, contiguous bf16 operands, 16-byte aligned (`available`: the
chunks' addresses reach the kernel as integers, so it is told their alignment), and not while
a CUDA graph is captured (`launchable`); everywhere else the gather and `F.grouped_mm` stay.
The plain (unchunked) path uses it too, for one chunk: `braid.ops.grouped_gemm.wide_dtype`
asks for the fp32 dW of an fp32 master weight, eagerly or, inside compiled graphs, through
the operator `braid::wgrad_fp32` (`wgrad_fp32_op`).
Shapes: C chunks, R_c rows of chunk c, D in-features, F out-features, E experts.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: `available()` is False
    triton = None

# (BLOCK_D, BLOCK_F, BLOCK_K, GROUP_D, num_warps, num_stages)
CONFIG = (128, 256, 64, 8, 8, 4)


@functools.cache
def _hopper(index: int) -> bool:
    """Its tiles (4 stages of 48 KB in shared memory) and bf16 dots want sm90 or newer."""
    return torch.cuda.get_device_capability(index)[0] >= 9


def usable(xs: list[Tensor], gs: list[Tensor]) -> bool:
    """Whether the kernel takes operands of these shapes, dtypes and layouts (all but their
    addresses: what a compiled graph's fake tensors can tell), on an sm90+ GPU."""
    if triton is None or not xs:
        return False
    dev = xs[0].device
    if dev.type != "cuda" or not _hopper(dev.index if dev.index is not None else 0):
        return False
    return all(
        t.is_cuda and t.device == dev and t.dtype == torch.bfloat16 and t.dim() == 2
        and t.is_contiguous() and t.shape[1] % 8 == 0
        for t in (*xs, *gs)
    ) and all(x.shape[0] == g.shape[0] for x, g in zip(xs, gs, strict=True))  # fmt: skip


def launchable(ts: list[Tensor]) -> bool:
    """Whether the kernel may launch on these tensors now: 16-byte aligned addresses, and no
    CUDA graph being captured (the address table is a host copy a replay could not renew)."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return all(t.data_ptr() % 16 == 0 for t in ts)


def available(xs: list[Tensor], gs: list[Tensor]) -> bool:
    """Whether `wgrad_fp32` may compute the dW of these chunks' operands now (eagerly)."""
    if torch.compiler.is_compiling():
        return False
    return usable(xs, gs) and launchable([*xs, *gs])


if triton is not None:

    @triton.jit
    def _wgrad_kernel(
        xs_ptr, gs_ptr, offs_ptr, out_ptr, C, E, D, F,
        ADD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
        BLOCK_K: tl.constexpr, GROUP_D: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        e = tl.program_id(1)
        n_d = tl.cdiv(D, BLOCK_D)
        n_f = tl.cdiv(F, BLOCK_F)
        per_group = GROUP_D * n_f
        first_d = (pid // per_group) * GROUP_D
        rows_d = tl.minimum(n_d - first_d, GROUP_D)
        pd = first_d + (pid % per_group) % rows_d
        pf = (pid % per_group) // rows_d
        rd = pd * BLOCK_D + tl.arange(0, BLOCK_D)
        rf = pf * BLOCK_F + tl.arange(0, BLOCK_F)
        rk = tl.arange(0, BLOCK_K).to(tl.int64)
        d_in = rd < D
        f_in = rf < F
        acc = tl.zeros((BLOCK_D, BLOCK_F), dtype=tl.float32)
        for c in range(0, C):
            x_ptr = tl.multiple_of(tl.load(xs_ptr + c).to(tl.pointer_type(tl.bfloat16)), 16)
            g_ptr = tl.multiple_of(tl.load(gs_ptr + c).to(tl.pointer_type(tl.bfloat16)), 16)
            prev = tl.load(offs_ptr + c * E + tl.maximum(e - 1, 0)).to(tl.int64)
            start = tl.where(e > 0, prev, 0)
            end = tl.load(offs_ptr + c * E + e).to(tl.int64)
            for k in range(start, end, BLOCK_K):
                kk = k + rk
                k_in = kk < end
                a_in = k_in[None, :] & d_in[:, None]
                a = tl.load(x_ptr + kk[None, :] * D + rd[:, None], mask=a_in, other=0.0)
                b_in = k_in[:, None] & f_in[None, :]
                b = tl.load(g_ptr + kk[:, None] * F + rf[None, :], mask=b_in, other=0.0)
                acc = tl.dot(a, b, acc)
        o = out_ptr + e.to(tl.int64) * D * F + rd[:, None].to(tl.int64) * F + rf[None, :]
        o_in = d_in[:, None] & f_in[None, :]
        if ADD:
            acc += tl.load(o, mask=o_in, other=0.0)
        tl.store(o, acc, mask=o_in)


def wgrad_fp32(
    xs: list[Tensor],
    gs: list[Tensor],
    offs: list[Tensor],
    acc: Tensor | None = None,
    config: tuple[int, ...] = CONFIG,
) -> Tensor:
    """dW [E, D, F] in fp32 over the chunks' rows (`xs[c]`, `gs[c]` grouped by expert at the
    cumulative `offs[c]`): a new tensor, or added into `acc` (fp32 [E, D, F], contiguous)."""
    E, D, F = offs[0].numel(), xs[0].shape[1], gs[0].shape[1]
    dev = xs[0].device
    if acc is not None and (
        acc.shape != (E, D, F) or acc.dtype != torch.float32 or not acc.is_contiguous()
    ):
        raise ValueError(
            f"wgrad_fp32: accumulator {tuple(acc.shape)} {acc.dtype}; expected a contiguous "
            f"{(E, D, F)} float32 tensor"
        )
    out = torch.empty(E, D, F, dtype=torch.float32, device=dev) if acc is None else acc
    if out.numel() == 0:
        return out
    # The chunks' addresses: the tensors stay alive in the caller until the kernel has run.
    ptrs = torch.tensor([[t.data_ptr() for t in xs], [t.data_ptr() for t in gs]])
    ptrs = ptrs.pin_memory().to(dev, non_blocking=True)
    offs_CE = torch.stack([o.to(device=dev, dtype=torch.int32) for o in offs])
    block_d, block_f, block_k, group_d, warps, stages = config
    grid = (triton.cdiv(D, block_d) * triton.cdiv(F, block_f), E)
    with torch.cuda.device(dev):  # Triton launches on the current device
        _wgrad_kernel[grid](
            ptrs[0], ptrs[1], offs_CE, out, len(xs), E, D, F,
            ADD=acc is not None, BLOCK_D=block_d, BLOCK_F=block_f, BLOCK_K=block_k,
            GROUP_D=group_d, num_warps=warps, num_stages=stages,
        )  # fmt: skip
    if acc is not None:
        torch.autograd.graph.increment_version(acc)
    return out


@torch.library.custom_op("braid::wgrad_fp32", mutates_args=())
def wgrad_fp32_op(x_RD: Tensor, g_RF: Tensor, offs_E: Tensor) -> Tensor:
    """One chunk's fp32 dW as an operator torch.compile keeps whole (a compiled backward calls
    the kernel instead of tracing into it); operands at unaligned addresses, or a CUDA graph
    being captured (`launchable`), take `F.grouped_mm` and the cast instead, the same sums
    rounded once more to bf16."""
    if launchable([x_RD, g_RF]):
        return wgrad_fp32([x_RD], [g_RF], [offs_E])
    dw = torch.nn.functional.grouped_mm(x_RD.t(), g_RF, offs=offs_E)
    return dw.to(torch.float32)


@wgrad_fp32_op.register_fake
def _(x_RD: Tensor, g_RF: Tensor, offs_E: Tensor) -> Tensor:
    return x_RD.new_empty(offs_E.shape[0], x_RD.shape[1], g_RF.shape[1], dtype=torch.float32)
