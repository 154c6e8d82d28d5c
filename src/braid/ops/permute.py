"""Row permutations of the MoE layer whose backwards are gathers: no atomics, deterministic.

Autograd's backward of `index_select` is `index_add`, a scatter with atomic adds on CUDA: slow
for wide rows (it dominated the non-GEMM time of a fine-grained layer on an H200, see
benchmarks/results/moe_profile_h200.json) and, in floating point, dependent on thread timing.
Dropless routing gives every token exactly K copies, so each scatter here has a gather form:

- `permute_rows(x, perm, inv)`: y = x[perm], a bijection; backward g[inv].
- `expand_tokens(x_ND, token_M, pos_NK, dtype)`: the M = N*K copies x[token_M] in sorted order,
  cast to the GEMMs' dtype in the same pass (on CUDA one compiled kernel: an fp32 residual
  stream is never copied K times in fp32); backward: the K copies of each token gathered back
  (pos_NK[n, k] is the sorted position of copy k of token n) and summed in k order.
- `combine_tokens(y_MD, gates_NK, pos_NK, order_M)`: out[n] = sum_k gates[n, k] * y[pos[n, k]];
  backward: dgates by row dot products, dy gathered into sorted order by `order_M`
  (sorted position -> copy index n*K + k, the inverse of pos). On CUDA forward and backward
  are one-pass kernels that never write the gathered copies or the products (`_CombineFused`:
  Triton's in `braid.ops.combine_triton`, else compiled from the same math).
- `regroup_index(recv_WL, total)`: rows received as [source rank][local expert] blocks, put in
  [local expert][source rank] order, so that each expert's rows are contiguous.
- `fill_drain_ends(total, C)`: the ends of C pipeline chunks, the first and the last about half
  the size of the others; `expert_bounds(L, C)`: the local experts of each chunk of experts;
  `token_bounds(N, C)`: the tokens of each chunk of tokens.
Sums over k accumulate in fp32 for bf16 inputs (torch reductions do) and round once.
Shapes: N tokens, K copies per token, M = N*K rows, D row width.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from braid.ops import combine_triton


def inverse_permutation(perm: Tensor) -> Tensor:
    """inv with inv[perm[i]] = i (a scatter of M integers, cheaper than an argsort)."""
    return torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, perm, inv):
        ctx.save_for_backward(inv)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, g):
        (inv,) = ctx.saved_tensors
        return g.index_select(0, inv), None, None


def permute_rows(x: Tensor, perm: Tensor, inv: Tensor) -> Tensor:
    """x[perm] for a permutation `perm` whose inverse is `inv`."""
    return _Permute.apply(x, perm, inv)


def _gather_cast(x_ND: Tensor, token_M: Tensor, dtype: torch.dtype) -> Tensor:
    return x_ND.index_select(0, token_M).to(dtype)


@functools.cache
def _gather_cast_compiled():
    # One kernel: each copy read once in x's dtype and written once in the compute dtype
    # (dynamic: the row count changes with the batch).
    return torch.compile(_gather_cast, dynamic=True)


def gather_rows(
    x_ND: Tensor, token_M: Tensor, dtype: torch.dtype | None = None, fused: bool | None = None
) -> Tensor:
    """x[token_M] cast to `dtype`; on CUDA (`fused` by default) gather and cast are one pass."""
    if dtype is None or dtype == x_ND.dtype:
        return x_ND.index_select(0, token_M)
    if fused is None:  # training on CUDA (inference skips the compile)
        fused = x_ND.is_cuda and torch.is_grad_enabled() and not torch.compiler.is_compiling()
    return (_gather_cast_compiled() if fused else _gather_cast)(x_ND, token_M, dtype)


class _Expand(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, token_M, pos_NK, dtype, fused):
        ctx.save_for_backward(pos_NK)
        ctx.x_dtype = x_ND.dtype
        return gather_rows(x_ND, token_M, dtype, fused)

    @staticmethod
    def backward(ctx, g_MD):
        (pos_NK,) = ctx.saved_tensors
        return sum_copies(g_MD, pos_NK, ctx.x_dtype), None, None, None, None


def sum_copies(g_MD: Tensor, pos_NK: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """dx[n] = sum_k g[pos[n, k]]: the K copies of each token, gathered and summed (in fp32 for
    bf16 rows, rounded once to `dtype`, by default g's own)."""
    N, K = pos_NK.shape
    g_NKD = g_MD.index_select(0, pos_NK.flatten()).view(N, K, g_MD.shape[-1])
    if dtype is None or dtype == g_MD.dtype:
        return g_NKD.sum(1)
    return g_NKD.sum(1, dtype=torch.promote_types(dtype, torch.float32)).to(dtype)


def expand_tokens(
    x_ND: Tensor,
    token_M: Tensor,
    pos_NK: Tensor,
    dtype: torch.dtype | None = None,
    fused: bool | None = None,
) -> Tensor:
    """The rows x[token_M], cast to `dtype` (the GEMMs' dtype) as they are gathered, so the
    copies never exist in x's wider dtype; the backward sums each token's K copies (no
    scatter) in fp32 and returns x's dtype."""
    return _Expand.apply(x_ND, token_M, pos_NK, dtype, fused)


def weighted_sum(y_MD: Tensor, gates_NK: Tensor, pos_NK: Tensor) -> tuple[Tensor, Tensor]:
    """(out[n] = sum_k gates[n, k] * y[pos[n, k]], the gathered y_NKD)."""
    N, K = pos_NK.shape
    y_NKD = y_MD.index_select(0, pos_NK.flatten()).view(N, K, y_MD.shape[-1])
    return (y_NKD * gates_NK.to(y_MD.dtype)[..., None]).sum(1), y_NKD


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_MD, gates_NK, pos_NK, order_M):
        out, y_NKD = weighted_sum(y_MD, gates_NK, pos_NK)
        ctx.save_for_backward(y_NKD, gates_NK, order_M)
        return out

    @staticmethod
    def backward(ctx, g_ND):
        y_NKD, gates_NK, order_M = ctx.saved_tensors
        g_ND = g_ND.to(y_NKD.dtype)
        dgates = None
        if ctx.needs_input_grad[1]:
            dgates = (y_NKD * g_ND[:, None, :]).sum(-1).to(gates_NK.dtype)
        dy_MD = None
        if ctx.needs_input_grad[0]:
            dy_NKD = gates_NK.to(g_ND.dtype)[..., None] * g_ND[:, None, :]
            dy_MD = dy_NKD.flatten(0, 1).index_select(0, order_M)
        return dy_MD, dgates, None, None


def combine_forward_math(y_MD: Tensor, gates_NK: Tensor, pos_NK: Tensor) -> Tensor:
    """out[n] = sum_k gates[n, k] * y[pos[n, k]], products and sum in fp32, rounded once."""
    N, K = pos_NK.shape
    y_NKD = y_MD.index_select(0, pos_NK.flatten()).view(N, K, y_MD.shape[-1]).float()
    return (y_NKD * gates_NK.float()[..., None]).sum(1).to(y_MD.dtype)


def combine_backward_math(
    y_MD: Tensor, gates_NK: Tensor, pos_NK: Tensor, order_M: Tensor, g_ND: Tensor
) -> tuple[Tensor, Tensor]:
    """(dy_MD, dgates_NK): dy[m] = gates[copy m] * g[token of m] written in sorted order, and
    dgates[n, k] = <y[pos[n, k]], g[n]>, in fp32, rounded once."""
    N, K = pos_NK.shape
    g = g_ND.float()
    y_NKD = y_MD.index_select(0, pos_NK.flatten()).view(N, K, y_MD.shape[-1]).float()
    dgates = (y_NKD * g[:, None, :]).sum(-1).to(gates_NK.dtype)
    w_M = gates_NK.flatten().float().index_select(0, order_M)
    dy_MD = (w_M[:, None] * g.index_select(0, order_M // K)).to(y_MD.dtype)
    return dy_MD, dgates


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=True)


def combine_fused(y_MD: Tensor, gates_NK: Tensor, pos_NK: Tensor) -> Tensor:
    """`combine_forward_math` in one pass: the Triton kernel on CUDA, else compiled."""
    if combine_triton.available(y_MD):
        return combine_triton.forward(y_MD, gates_NK, pos_NK)
    return _compiled(combine_forward_math)(y_MD, gates_NK, pos_NK)


def combine_fused_grad(
    y_MD: Tensor, gates_NK: Tensor, pos_NK: Tensor, order_M: Tensor, g_ND: Tensor
) -> tuple[Tensor, Tensor]:
    """`combine_backward_math` in one pass: the Triton kernel on CUDA, else compiled."""
    if combine_triton.available(y_MD):
        return combine_triton.backward(y_MD, gates_NK, pos_NK, g_ND)
    return _compiled(combine_backward_math)(y_MD, gates_NK, pos_NK, order_M, g_ND.contiguous())


class _CombineFused(torch.autograd.Function):
    """`_Combine` as two compiled kernels a pass: the gathered copies y_NKD and the products
    never exist in memory (reference: `_Combine`, tested equal within one rounding)."""

    @staticmethod
    def forward(ctx, y_MD, gates_NK, pos_NK, order_M):
        ctx.save_for_backward(y_MD, gates_NK, pos_NK, order_M)
        return combine_fused(y_MD, gates_NK, pos_NK)

    @staticmethod
    def backward(ctx, g_ND):
        y_MD, gates_NK, pos_NK, order_M = ctx.saved_tensors
        dy_MD, dgates = combine_fused_grad(y_MD, gates_NK, pos_NK, order_M, g_ND)
        return dy_MD, dgates, None, None


def combine_rows(y_MD: Tensor, gates_NK: Tensor, pos_NK: Tensor, fused: bool) -> Tensor:
    """`combine_tokens`' value without autograd (the chunked pipeline's per-chunk finish):
    the compiled one-pass kernel when `fused`, else `weighted_sum`."""
    if fused and y_MD.shape[0] > 0:
        return combine_fused(y_MD, gates_NK, pos_NK)
    return weighted_sum(y_MD, gates_NK, pos_NK)[0]


def combine_rows_grad(
    y_MD: Tensor, gates_NK: Tensor, pos_NK: Tensor, order_M: Tensor, g_ND: Tensor, fused: bool
) -> tuple[Tensor, Tensor]:
    """`combine_rows`' backward without autograd: (dy_MD in sorted order, dgates_NK); the
    compiled one-pass kernel when `fused`, else the gathers and products of `_Combine`."""
    if fused and y_MD.shape[0] > 0:
        return combine_fused_grad(y_MD, gates_NK, pos_NK, order_M, g_ND)
    K = pos_NK.shape[1]
    g_MD = g_ND.index_select(0, order_M // K)
    dgates = (g_MD * y_MD).sum(1).to(gates_NK.dtype).index_select(0, pos_NK.flatten())
    w_M = gates_NK.flatten().index_select(0, order_M).to(y_MD.dtype)
    return g_MD * w_M[:, None], dgates.view_as(gates_NK)


@torch.library.custom_op("braid::combine", mutates_args=())
def combine_op(y_MD: Tensor, gates_NK: Tensor, pos_NK: Tensor, order_M: Tensor) -> Tensor:
    """`combine_tokens` as an operator torch.compile keeps whole (its own kernels for the
    gathers are the slow per-element form): the Triton kernels on CUDA, the fp32 math
    elsewhere. Its backward is `braid::combine_backward`; `order_M` only feeds that math."""
    if combine_triton.available(y_MD):
        return combine_triton.forward(y_MD, gates_NK, pos_NK)
    return combine_forward_math(y_MD, gates_NK, pos_NK).contiguous()


@combine_op.register_fake
def _(y_MD: Tensor, gates_NK: Tensor, pos_NK: Tensor, order_M: Tensor) -> Tensor:
    return y_MD.new_empty(pos_NK.shape[0], y_MD.shape[1])


@torch.library.custom_op("braid::combine_backward", mutates_args=())
def combine_backward_op(
    y_MD: Tensor, gates_NK: Tensor, pos_NK: Tensor, order_M: Tensor, g_ND: Tensor
) -> tuple[Tensor, Tensor]:
    if combine_triton.available(y_MD):
        return combine_triton.backward(y_MD, gates_NK, pos_NK, g_ND)
    dy, dgates = combine_backward_math(y_MD, gates_NK, pos_NK, order_M, g_ND.contiguous())
    return dy.contiguous(), dgates.contiguous()


@combine_backward_op.register_fake
def _(y_MD: Tensor, gates_NK: Tensor, pos_NK: Tensor, order_M: Tensor, g_ND: Tensor):
    return y_MD.new_empty(y_MD.shape), gates_NK.new_empty(gates_NK.shape)


def _combine_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _combine_backward(ctx, g_ND: Tensor):
    y_MD, gates_NK, pos_NK, order_M = ctx.saved_tensors
    dy_MD, dgates = combine_backward_op(y_MD, gates_NK, pos_NK, order_M, g_ND)
    return dy_MD, dgates, None, None


combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)


def combine_tokens(
    y_MD: Tensor, gates_NK: Tensor, pos_NK: Tensor, order_M: Tensor, fused: bool | None = None
) -> Tensor:
    """Each token's K expert outputs (rows in sorted order), weighted by its gates and summed;
    `fused` (default: training on CUDA outside torch.compile) runs the one-pass kernels.
    Under torch.compile on CUDA with Triton: the `braid::combine` operator."""
    if torch.compiler.is_compiling() and y_MD.is_cuda and combine_triton.triton is not None:
        return combine_op(y_MD, gates_NK, pos_NK, order_M)
    if fused is None:
        fused = y_MD.is_cuda and torch.is_grad_enabled() and not torch.compiler.is_compiling()
        fused = fused and y_MD.shape[0] > 0
    return (_CombineFused if fused else _Combine).apply(y_MD, gates_NK, pos_NK, order_M)


def regroup_index(recv_WL: Tensor, total: int) -> Tensor:
    """Row permutation taking [source rank][local expert] chunks to [local expert][source rank]."""
    W, L = recv_WL.shape
    sizes_WL = recv_WL.flatten()
    starts_WL = (torch.cumsum(sizes_WL, 0) - sizes_WL).view(W, L)
    sizes_LW, starts_LW = recv_WL.t().flatten(), starts_WL.t().flatten()
    new_starts_LW = torch.cumsum(sizes_LW, 0) - sizes_LW
    shift = torch.repeat_interleave(starts_LW - new_starts_LW, sizes_LW, output_size=total)
    return torch.arange(total, device=recv_WL.device) + shift


def fill_drain_ends(total: int, num_chunks: int) -> list[int]:
    """The cumulative ends of C contiguous chunks of `total` items, weighted 1 for the first
    and the last chunk and 2 for the others when C >= 3 (equal chunks when C < 3), each end
    rounded to the nearest item: the first chunk's dispatch and the last chunk's combine are
    the pipeline's fill and drain, which nothing overlaps, so those chunks are kept short.
    The ends never fall and the last is `total`; a chunk may be empty when total < C."""
    w = [1.0 if c in (0, num_chunks - 1) or num_chunks < 3 else 2.0 for c in range(num_chunks)]
    cum, ends = 0.0, []
    for x in w:
        cum += x
        ends.append(round(cum / sum(w) * total))
    return ends


def expert_bounds(num_local: int, num_chunks: int) -> list[tuple[int, int]]:
    """C contiguous ranges of the L local experts, none empty, the first and the last about
    half the size of the others (C >= 3, `fill_drain_ends`)."""
    if num_chunks > num_local:
        raise ValueError(f"chunks of experts: {num_chunks} chunks > {num_local} experts per rank")
    ends = fill_drain_ends(num_local, num_chunks)
    for c in range(num_chunks):  # none empty: at least one expert each, from both ends
        ends[c] = max(ends[c], (ends[c - 1] if c else 0) + 1)
    for c in reversed(range(num_chunks - 1)):
        ends[c] = min(ends[c], ends[c + 1] - 1)
    return list(zip([0] + ends[:-1], ends, strict=True))


def token_bounds(num_tokens: int, num_chunks: int) -> list[tuple[int, int]]:
    """C contiguous ranges covering [0, N) in order, the first and the last about half the size
    of the others when C >= 3, as for chunks of experts (`fill_drain_ends`); equal (to one
    token) when C < 3. Some may be empty when N < C."""
    ends = fill_drain_ends(num_tokens, num_chunks)
    return list(zip([0] + ends[:-1], ends, strict=True))
