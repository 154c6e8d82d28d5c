"""The fp8 experts' quantisers as one-pass Triton kernels (CUDA), fused with what feeds them.

Same recipe and results as `braid.ops.fp8` (power-of-two scales, e4m3 round-to-nearest-even;
the GPU tests check bit equality with the reference quantisers):
- `quantize_rows`: a scale per row. One program per row: rows up to ONE_STEP_MAX wide are read
  once into registers, wider ones twice (amax, then the cast from L2); torch.compile's kernel
  for the same math passed over memory twice.
- `swiglu_quantize`: y = silu(gate) * up rounded to h's dtype, then quantised per row, without
  writing y (the codes are what the down GEMM reads and what its dW keeps).
- `swiglu_backward_quantize`: dh of the SwiGLU (written, the up GEMM's dW reads it) and its
  rowwise codes from the same pass.
- `dequantize_rows`: codes times row scales, in the GEMM dtype (for a dW in bf16).
- `quantize_groups`: the operand of the 2d-2d fp8 grouped dW GEMM: per expert group of rows,
  a scale per column over that group's rows; codes stored transposed [D, W] with each group
  starting at its padded offset (zeros in the padding). Reads bf16 rows, or rowwise codes and
  scales (dequantised exactly in fp32), so saved fp8 activations are never expanded in memory.
  Two passes: column amaxes of row spans (each group's rows split over several programs, met
  in an atomic max; max is order-free, so the result is deterministic), then the cast.
- `quantize_cols`: a scale per column (the weights' forward codes, transposed per expert): the
  same two passes, each leading index a group.
The SwiGLU formulas are `braid.ops.swiglu_triton`'s (fp32 inside, rounded once to h's dtype).
Shapes: R rows, D columns, F expert hidden size, E groups, W padded width.
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

E4M3 = torch.float8_e4m3fn
MAX_BLOCK = 8192  # columns per step of a row program wider than ONE_STEP_MAX
ONE_STEP_MAX = 16384  # rows up to this wide are read once (held in registers)
# The tile and warps of the per-(group, column) kernels: the fastest of a sweep on one H200
# (benchmarks/fp8_quant_tiles.py), 14% faster than 64 x 64 with 4 warps.
GROUP_ROWS, GROUP_COLS, GROUP_WARPS = 128, 32, 2
SPLIT_ROWS = 1024  # rows per program of `quantize_groups` in a balanced group


def available(x: Tensor) -> bool:
    return triton is not None and x.is_cuda and x.numel() > 0 and fp8_casts(x.device.index)


@functools.cache
def fp8_casts(index: int | None) -> bool:
    """Whether CUDA device `index` has Triton's e4m3 casts: NVIDIA, compute capability 8.9+
    (elsewhere `braid.ops.fp8` keeps its compiled quantisers)."""
    return torch.version.hip is None and torch.cuda.get_device_capability(index) >= (8, 9)


if triton is not None:

    @triton.jit
    def _scale(amax):
        """2^ceil(log2(amax / 448)), exactly as `braid.ops.fp8.pow2_ceil`; 1 for zero rows."""
        r = tl.math.div_rn(tl.where(amax > 7.888609052210118e-31, amax, 448.0), 448.0)
        bits = r.to(tl.int32, bitcast=True)
        return ((bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)

    @triton.jit
    def _inverse(s):
        """1 / s, exact for the power-of-two scales `_scale` makes (2^-108 .. 2^120: inverses
        2^-120 .. 2^108, all normal): v * _inverse(s) rounds the same real number as v / s,
        once, so the codes equal the division's bit for bit at the cost of a multiply (a
        correctly rounded division is a dozen instructions)."""
        return tl.math.div_rn(1.0, s)

    @triton.jit
    def _rows_kernel(x_ptr, q_ptr, s_ptr, D, BLOCK: tl.constexpr, ONE_STEP: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row, q_row = x_ptr + row * D, q_ptr + row * D
        if ONE_STEP:  # the whole row in registers: one read
            cols = tl.arange(0, BLOCK)
            v = tl.load(x_row + cols, mask=cols < D, other=0.0).to(tl.float32)
            s = _scale(tl.max(tl.abs(v), 0))
            tl.store(s_ptr + row, s)
            tl.store(q_row + cols, (v * _inverse(s)).to(tl.float8e4nv), mask=cols < D)
        else:
            amax = tl.zeros([BLOCK], tl.float32)
            for start in range(0, D, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                v = tl.load(x_row + cols, mask=cols < D, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(v))
            s = _scale(tl.max(amax, 0))
            tl.store(s_ptr + row, s)
            inv = _inverse(s)
            for start in range(0, D, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                v = tl.load(x_row + cols, mask=cols < D, other=0.0).to(tl.float32)
                tl.store(q_row + cols, (v * inv).to(tl.float8e4nv), mask=cols < D)

    @triton.jit
    def _swiglu(h_row, cols, F, mask):
        gate = tl.load(h_row + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_row + F + cols, mask=mask, other=0.0).to(tl.float32)
        return gate * tl.sigmoid(gate) * up

    @triton.jit
    def _swiglu_rows_kernel(h_ptr, q_ptr, s_ptr, F, BLOCK: tl.constexpr, ONE_STEP: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        h_row, q_row = h_ptr + row * 2 * F, q_ptr + row * F
        dt = h_ptr.dtype.element_ty
        if ONE_STEP:
            cols = tl.arange(0, BLOCK)
            y = _swiglu(h_row, cols, F, cols < F).to(dt).to(tl.float32)
            s = _scale(tl.max(tl.abs(y), 0))
            tl.store(s_ptr + row, s)
            tl.store(q_row + cols, (y * _inverse(s)).to(tl.float8e4nv), mask=cols < F)
        else:
            amax = tl.zeros([BLOCK], tl.float32)
            for start in range(0, F, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                y = _swiglu(h_row, cols, F, cols < F).to(dt).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(y))
            s = _scale(tl.max(amax, 0))
            tl.store(s_ptr + row, s)
            inv = _inverse(s)
            for start in range(0, F, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                y = _swiglu(h_row, cols, F, cols < F).to(dt).to(tl.float32)
                tl.store(q_row + cols, (y * inv).to(tl.float8e4nv), mask=cols < F)

    @triton.jit
    def _swiglu_grads(h_row, dy_row, cols, F, dt):
        mask = cols < F
        gate = tl.load(h_row + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_row + F + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        sg = tl.sigmoid(gate)
        dgate = (dy * up * sg * (1 + gate * (1 - sg))).to(dt)
        return dgate, (dy * gate * sg).to(dt)

    @triton.jit
    def _swiglu_backward_rows_kernel(
        h_ptr, dy_ptr, dh_ptr, q_ptr, s_ptr, F, BLOCK: tl.constexpr, ONE_STEP: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        h_row, dh_row, q_row = h_ptr + row * 2 * F, dh_ptr + row * 2 * F, q_ptr + row * 2 * F
        dy_row = dy_ptr + row * F
        dt = dh_ptr.dtype.element_ty
        if ONE_STEP:  # dh stays in registers for its codes
            cols = tl.arange(0, BLOCK)
            mask = cols < F
            dgate, dup = _swiglu_grads(h_row, dy_row, cols, F, dt)
            tl.store(dh_row + cols, dgate, mask=mask)
            tl.store(dh_row + F + cols, dup, mask=mask)
            dgate, dup = dgate.to(tl.float32), dup.to(tl.float32)
            s = _scale(tl.max(tl.maximum(tl.abs(dgate), tl.abs(dup)), 0))
            tl.store(s_ptr + row, s)
            inv = _inverse(s)
            tl.store(q_row + cols, (dgate * inv).to(tl.float8e4nv), mask=mask)
            tl.store(q_row + F + cols, (dup * inv).to(tl.float8e4nv), mask=mask)
        else:
            amax = tl.zeros([BLOCK], tl.float32)
            for start in range(0, F, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < F
                dgate, dup = _swiglu_grads(h_row, dy_row, cols, F, dt)
                tl.store(dh_row + cols, dgate, mask=mask)
                tl.store(dh_row + F + cols, dup, mask=mask)
                a = tl.maximum(tl.abs(dgate.to(tl.float32)), tl.abs(dup.to(tl.float32)))
                amax = tl.maximum(amax, a)
            s = _scale(tl.max(amax, 0))
            tl.store(s_ptr + row, s)
            inv = _inverse(s)
            tl.debug_barrier()  # other threads stored parts of the row read back below
            for start in range(0, 2 * F, BLOCK):  # the row just written, read back from L2
                cols = start + tl.arange(0, BLOCK)
                v = tl.load(dh_row + cols, mask=cols < 2 * F, other=0.0).to(tl.float32)
                tl.store(q_row + cols, (v * inv).to(tl.float8e4nv), mask=cols < 2 * F)

    @triton.jit
    def _dequant_kernel(q_ptr, s_ptr, x_ptr, D, nblk, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        row = (pid // nblk).to(tl.int64)
        cols = (pid % nblk) * BLOCK + tl.arange(0, BLOCK)
        q = tl.load(q_ptr + row * D + cols, mask=cols < D, other=0.0).to(tl.float32)
        x = q * tl.load(s_ptr + row)
        tl.store(x_ptr + row * D + cols, x.to(x_ptr.dtype.element_ty), mask=cols < D)

    @triton.jit
    def _group_span(offs_ptr, pend_ptr, e, k, D, W, SPLIT, BR: tl.constexpr, BLOCKED: tl.constexpr):
        """Group e's rows [start, end), its codes' base offset and column stride in q, and the
        padded rows [lo, hi) (relative to start) that split k of SPLIT covers."""
        start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
        end = tl.load(offs_ptr + e)
        if BLOCKED:  # a [D, rows] block per group, back to back, no padding
            padded = end - start
            stride = padded
            base = e.to(tl.int64) * D * padded
        else:  # one [D, W] layout, group columns from its padded start
            padded = (end - start + 15) // 16 * 16
            stride = W
            base = (tl.load(pend_ptr + e) - padded).to(tl.int64)
        chunk = (tl.cdiv(padded, SPLIT) + BR - 1) // BR * BR
        lo = k * chunk
        return start, end, base, stride, lo, tl.minimum(lo + chunk, padded)

    @triton.jit
    def _groups_amax_kernel(
        x_ptr, srow_ptr, offs_ptr, pend_ptr, amax_ptr, D, W, SPLIT,
        HAS_SROW: tl.constexpr, BLOCKED: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
    ):  # fmt: skip
        e, k = tl.program_id(0), tl.program_id(2)
        cols = tl.program_id(1) * BD + tl.arange(0, BD)
        cmask = cols < D
        start, end, _, _, lo, hi = _group_span(offs_ptr, pend_ptr, e, k, D, W, SPLIT, BR, BLOCKED)
        amax = tl.zeros([BD], tl.float32)
        for r0 in range(start + lo, tl.minimum(start + hi, end), BR):
            rows = r0 + tl.arange(0, BR)
            v = _group_tile(x_ptr, srow_ptr, rows, cols, end, D, cmask, HAS_SROW)
            amax = tl.maximum(amax, tl.max(tl.abs(v), 0))
        tl.atomic_max(amax_ptr + e * D + cols, amax, mask=cmask & (lo < hi))

    @triton.jit
    def _groups_cast_kernel(
        x_ptr, srow_ptr, offs_ptr, pend_ptr, amax_ptr, q_ptr, s_ptr, D, W, E, SPLIT,
        HAS_SROW: tl.constexpr, BLOCKED: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
    ):  # fmt: skip
        e, k = tl.program_id(0), tl.program_id(2)
        cols = tl.program_id(1) * BD + tl.arange(0, BD)
        cmask = cols < D
        if e == E:  # the padded layout's tail past the last group: zeros
            pstart = tl.load(pend_ptr + E - 1)
            chunk = (tl.cdiv(W - pstart, SPLIT) + BR - 1) // BR * BR
            for c0 in range(pstart + k * chunk, tl.minimum(pstart + (k + 1) * chunk, W), BR):
                cc = c0 + tl.arange(0, BR)
                ptr = q_ptr + cols[:, None].to(tl.int64) * W + cc[None, :]
                zero = tl.zeros([BD, BR], tl.float32).to(tl.float8e4nv)
                tl.store(ptr, zero, mask=cmask[:, None] & (cc[None, :] < W))
        else:
            start, end, base, stride, lo, hi = _group_span(
                offs_ptr, pend_ptr, e, k, D, W, SPLIT, BR, BLOCKED
            )
            s = _scale(tl.load(amax_ptr + e * D + cols, mask=cmask, other=0.0))
            tl.store(s_ptr + e * D + cols, s, mask=cmask & (k == 0))
            inv = _inverse(s)
            for i in range(lo, hi, BR):
                rows = start + i + tl.arange(0, BR)
                v = _group_tile(x_ptr, srow_ptr, rows, cols, end, D, cmask, HAS_SROW)
                q = (v * inv[None, :]).to(tl.float8e4nv)  # [BR, BD], zero past end
                cc = i + tl.arange(0, BR)
                ptr = q_ptr + base + cols[:, None].to(tl.int64) * stride + cc[None, :]
                tl.store(ptr, tl.trans(q), mask=cmask[:, None] & (cc[None, :] < hi))

    @triton.jit
    def _group_tile(x_ptr, srow_ptr, rows, cols, end, D, cmask, HAS_SROW: tl.constexpr):
        rmask = rows < end
        ptr = x_ptr + rows[:, None].to(tl.int64) * D + cols[None, :]
        v = tl.load(ptr, mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        if HAS_SROW:
            v = v * tl.load(srow_ptr + rows, mask=rmask, other=0.0)[:, None]
        return v


def _launch(kernel, grid, x: Tensor, *args, **kw) -> None:
    with torch.cuda.device(x.device):
        kernel[grid](*args, **kw)


def _row_block(width: int) -> dict:
    """A row program's step and warps. Rows up to ONE_STEP_MAX wide are read once, whole, into
    registers; wider ones in MAX_BLOCK steps, twice (amax, then cast), with few rows in flight
    so that the second read comes from L2, not HBM."""
    one = width <= ONE_STEP_MAX
    block = triton.next_power_of_2(width) if one else MAX_BLOCK
    return {"BLOCK": block, "ONE_STEP": one, "num_warps": max(4, min(32, block // 512))}


def quantize_rows(x_RD: Tensor) -> tuple[Tensor, Tensor]:
    """`fp8.quantize_ref` of a contiguous [R, D]: (q [R, D], s [R, 1])."""
    x = x_RD.contiguous()
    R, D = x.shape
    q, s = torch.empty(R, D, dtype=E4M3, device=x.device), x.new_empty(R, 1, dtype=torch.float32)
    _launch(_rows_kernel, (R,), x, x, q, s, D, **_row_block(D))
    return q, s


def swiglu_quantize(h_RF2: Tensor) -> tuple[Tensor, Tensor]:
    """`fp8.quantize_ref(swiglu(h))` without writing the SwiGLU's output: (q [R, F], s [R, 1])."""
    h = h_RF2.contiguous()
    R, F = h.shape[0], h.shape[1] // 2
    q, s = torch.empty(R, F, dtype=E4M3, device=h.device), h.new_empty(R, 1, dtype=torch.float32)
    _launch(_swiglu_rows_kernel, (R,), h, h, q, s, F, **_row_block(F))
    return q, s


def swiglu_backward_quantize(h_RF2: Tensor, dy_RF: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The SwiGLU's dh [R, 2F] (h's dtype) and `fp8.quantize_ref(dh)`: (dh, q, s)."""
    h, dy = h_RF2.contiguous(), dy_RF.contiguous()
    R, F = h.shape[0], h.shape[1] // 2
    dh, q = torch.empty_like(h), torch.empty(R, 2 * F, dtype=E4M3, device=h.device)
    s = h.new_empty(R, 1, dtype=torch.float32)
    _launch(_swiglu_backward_rows_kernel, (R,), h, h, dy, dh, q, s, F, **_row_block(F))
    return dh, q, s


def dequantize_rows(q_RD: Tensor, s_R1: Tensor, dtype: torch.dtype) -> Tensor:
    """`fp8.dequantize(q, s, dtype)` in one pass."""
    q_RD, s_R1 = q_RD.contiguous(), s_R1.contiguous()
    R, D = q_RD.shape
    x = torch.empty(R, D, dtype=dtype, device=q_RD.device)
    nblk = triton.cdiv(D, 1024)
    _launch(_dequant_kernel, (R * nblk,), q_RD, q_RD, s_R1, x, D, nblk, BLOCK=1024, num_warps=4)
    return x


def _groups(
    x_RD: Tensor, srow: Tensor | None, offs_E: Tensor, pend_E: Tensor, q: Tensor, width: int,
    blocked: bool, split_rows: int,
) -> Tensor:  # fmt: skip
    """Run the two passes of the per-(group, column) quantiser into `q`; returns the scales
    [E, D]. Pass 1 splits each group's rows over `SPLIT` programs per column block (their
    column amaxes meet in an atomic max), pass 2 casts the same spans."""
    R, D = x_RD.shape
    E = offs_E.numel()
    split = max(1, min(64, triton.cdiv(R, E * split_rows)))  # balanced groups: ~split_rows each
    amax = torch.zeros(E, D, dtype=torch.float32, device=x_RD.device)
    s = torch.empty(E, D, dtype=torch.float32, device=x_RD.device)
    srow = x_RD if srow is None else srow.contiguous()
    flags = {"HAS_SROW": srow is not x_RD, "BLOCKED": blocked, "BR": GROUP_ROWS, "BD": GROUP_COLS}
    flags["num_warps"] = GROUP_WARPS
    cols = triton.cdiv(D, GROUP_COLS)
    args = (x_RD, srow, offs_E, pend_E)
    _launch(_groups_amax_kernel, (E, cols, split), x_RD, *args, amax, D, width, split, **flags)
    grid = (E + (not blocked), cols, split)
    _launch(_groups_cast_kernel, grid, x_RD, *args, amax, q, s, D, width, E, split, **flags)
    return s


def quantize_groups(
    x_RD: Tensor,
    offs_E: Tensor,
    pad_end_E: Tensor,
    width: int,
    s_R1: Tensor | None = None,
    split_rows: int = SPLIT_ROWS,
) -> tuple[Tensor, Tensor]:
    """`fp8.quantize_groups_ref` for rows grouped by `offs_E` (ends, int32) into a layout whose
    groups end at `pad_end_E` (`fp8_gemm.padded_groups`), zeros elsewhere: (q [D, W], s [E, D]).
    With `s_R1`, `x_RD` holds rowwise e4m3 codes and these are their scales. `split_rows`: rows
    per program and column block, for groups of balanced sizes (tests make it small)."""
    x = x_RD.contiguous()
    q = torch.empty(x.shape[1], width, dtype=E4M3, device=x.device)
    s = _groups(x, s_R1, offs_E, pad_end_E, q, width, False, split_rows)
    return q, s


def quantize_cols(x: Tensor, split_rows: int = SPLIT_ROWS) -> tuple[Tensor, Tensor]:
    """`fp8.quantize_cols_ref` of [..., K, N] (weights, or activations with tokens as K):
    (q [..., N, K], s [..., N, 1]). The per-group quantiser with every leading index a group of
    K rows and each group's codes in its own [N, K] block."""
    *lead, K, N = x.shape
    x2 = x.reshape(-1, N).contiguous()
    E = x2.shape[0] // K
    offs = torch.arange(1, E + 1, dtype=torch.int32, device=x.device) * K
    q = torch.empty(E, N, K, dtype=E4M3, device=x.device)
    s = _groups(x2, None, offs, offs, q, K, True, split_rows)
    return q.view(*lead, N, K), s.view(*lead, N, 1)
