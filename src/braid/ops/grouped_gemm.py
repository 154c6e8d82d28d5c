"""Grouped GEMM over experts: rows of `x_RD` are grouped by expert, one weight matrix per group.

Two implementations with identical results:
- `grouped`: one `torch.nn.functional.grouped_mm` call (offsets must be int32; rows past the
  last offset are left unwritten by the kernel, so callers never pass padding rows);
- `loop`: one matmul per expert, the slow reference and the fallback for odd shapes.

`grouped_linear` is differentiable with an explicit backward: the input gradient (dX) is computed
first and returned to autograd, and the weight gradient (dW) is either computed at once or handed
to a `wgrad_sink` callable, which the overlap scheduler runs while an exchange is in flight
(FluidMoE's dW/dX split). A sink with `add_rows(w, x, g, offs, impl, divide)` is handed the
dW's operands instead (`braid.overlap.joined_experts`: one dW over every chunk's rows); where it
returns False it did not take them, and the dW goes back to autograd.
Shapes: R rows, D in-features, F out-features, E experts.

The weight may be a DTensor parameter (experts under `braid.parallel`): the GEMMs run on its
local block, and dW goes back wrapped like the parameter (duck-typed, `type(w).from_local`, so
ops never imports torch.distributed), whether returned to autograd or written by a deferred
task into `w.grad` — so a deferred dW lands in the parameter itself. `grad_divide` divides dW
(braid.parallel sets it where no FSDP reduction applies the data-parallel mean).

An fp32 master weight under bf16 GEMMs on a GPU with Triton gets its dW in fp32 straight from
the dW GEMM (`wide_dtype`, `braid.ops.wgrad_triton`, inside compiled graphs as the operator
`braid::wgrad_fp32`) where dW becomes the grad as it is; elsewhere the bf16 dW is cast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from braid.ops import wgrad_triton
from braid.ops.grad_cast import cast, into_fp32

WgradSink = Callable[[Callable[[], None]], None]
# Experts [lo, hi) of the local block (a pipeline chunk of experts), and optionally whether the
# caller's parts cover the weight in this pass (`_add_part`).
Part = tuple[int, int] | tuple[int, int, bool]


def counts_to_offsets(counts_E: Tensor) -> Tensor:
    """Cumulative row offsets (int32, as grouped_mm wants) from per-expert row counts."""
    return torch.cumsum(counts_E, 0, dtype=torch.int32)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for x's device, else x's own dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _use_grouped(impl: str, x: Tensor) -> bool:
    # CUDA's grouped_mm takes bf16 only; fp32 on a GPU runs the loop (documented in config).
    # Its meta kernel, which torch.compile traces, insists on bf16 on every device, so fp32
    # under compile runs the loop too (eager CPU takes fp32).
    if impl != "grouped" or x.dtype == torch.bfloat16:
        return impl == "grouped"
    return x.device.type != "cuda" and not torch.compiler.is_compiling()


def gmm(x_RD: Tensor, w_EDF: Tensor, offs_E: Tensor, impl: str) -> Tensor:
    """y[rows of e] = x[rows of e] @ w[e]."""
    if _use_grouped(impl, x_RD):
        return F.grouped_mm(x_RD, w_EDF, offs=offs_E)
    return _loop_mm(x_RD, w_EDF, offs_E)


def gmm_wgrad(
    x_RD: Tensor, g_RF: Tensor, offs_E: Tensor, impl: str, out_dtype: torch.dtype | None = None
) -> Tensor:
    """dW[e] = x[rows of e]^T @ g[rows of e], shape [E, D, F] (zeros for experts with no rows),
    in the operands' dtype, or in `out_dtype` (fp32: see `wide_dtype`)."""
    if out_dtype == torch.float32 and impl == "grouped" and wgrad_triton.usable([x_RD], [g_RF]):
        if torch.compiler.is_compiling():  # the kernel as an operator of the compiled graph
            return wgrad_triton.wgrad_fp32_op(x_RD, g_RF, offs_E)
        if wgrad_triton.launchable([x_RD, g_RF]):
            return wgrad_triton.wgrad_fp32([x_RD], [g_RF], [offs_E])
    if _use_grouped(impl, x_RD):
        dw = F.grouped_mm(x_RD.t(), g_RF, offs=offs_E)
    else:
        bounds = [0] + offs_E.tolist()
        pairs = zip(bounds[:-1], bounds[1:], strict=True)
        dw = torch.stack([x_RD[a:b].t() @ g_RF[a:b] for a, b in pairs])
    return dw if out_dtype is None else cast(dw, out_dtype)


def wide_dtype(param: Tensor, x: Tensor, g: Tensor, impl: str) -> torch.dtype | None:
    """fp32 where the dW GEMM writes `param`'s fp32 grad itself (`braid.ops.wgrad_triton`: an
    fp32 master weight, bf16 operands on a GPU with Triton, the grouped impl): its accumulators
    stored as they are, 4 bytes a weight where a bf16 dW and its cast into the grad move 8, and
    no bf16 rounding on the way. None elsewhere: the GEMM's own dtype, cast after."""
    fp32 = param.dtype == torch.float32  # (a DTensor has its local block's dtype)
    return torch.float32 if fp32 and impl == "grouped" and wgrad_triton.usable([x], [g]) else None


def _loop_mm(x_RD: Tensor, w_EDF: Tensor, offs_E: Tensor) -> Tensor:
    bounds = [0] + offs_E.tolist()  # .tolist() is a host sync; this is the slow reference path
    out = x_RD.new_empty(x_RD.shape[0], w_EDF.shape[-1])
    for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        out[a:b] = x_RD[a:b] @ w_EDF[e]
    return out


def _local(w: Tensor) -> Tensor:
    return w.to_local() if hasattr(w, "to_local") else w


WeightCasts = dict  # (id(weight), what) -> (the weight, its cast): identity checked on use


def shared(casts: WeightCasts | None, w: Tensor, what: object, make: Callable[[], Any]) -> Any:
    """`make()` (a cast of weight `w`, named by `what`), once per `casts` dict: every call that
    passes the same dict gets the first result (the chunks of one pipelined layer: one copy,
    one cast). The entry keeps `w` itself, so a recycled id can never match another weight."""
    if casts is None:
        return make()
    key = (id(w), what)
    hit = casts.get(key)
    if hit is None or hit[0] is not w:
        hit = casts[key] = (w, make())
    return hit[1]


def cast_weight(w: Tensor, dtype: torch.dtype, casts: WeightCasts | None = None) -> Tensor:
    """The local block of `w` in `dtype`, shared through `casts` (see `shared`)."""
    return shared(casts, w, dtype, lambda: _local(w).to(dtype))


def _like_param(param: Tensor, dw_local: Tensor, divide: float) -> Tensor:
    """dW (of the local block) as the parameter's gradient: divided, wrapped like a DTensor."""
    if divide != 1.0:
        dw_local = dw_local.div_(divide)
    if not hasattr(param, "to_local"):
        return dw_local
    return type(param).from_local(
        dw_local,
        param.device_mesh,
        param.placements,
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )


def accumulate_grad(
    param: Tensor, dw_local: Tensor, divide: float = 1.0, part: Part | None = None
) -> None:
    """Add dW (of the local block) into `param.grad`, as a deferred dW task does. Into an
    existing grad at least as wide as dW (bf16 dW, fp32 grad) without a divide, dW is added as
    it is (the add reads it in its own dtype and sums in the grad's): bit for bit the add of
    its copy in the grad's dtype, without writing that copy, a weight-sized pass saved for every
    chunk or micro-batch after the first. Otherwise dW is cast first, as before.
    With `part` = (lo, hi), dW is that of experts [lo, hi) of the local block only (a pipeline
    chunk of experts) and is added into those rows of the grad (zeros where there was none)."""
    grad = param.grad
    if part is not None:
        _add_part(param, dw_local, divide, part)
        return
    wider = grad is not None and torch.promote_types(dw_local.dtype, grad.dtype) != grad.dtype
    if grad is None or divide != 1.0 or wider:
        dw = _like_param(param, cast(dw_local, param.dtype), divide)
        param.grad = dw if param.grad is None else param.grad.add_(dw)
    elif _fp32_plain(grad, dw_local):
        into_fp32(grad, dw_local)  # one vectorized pass (`braid.ops.grad_cast`)
    else:
        param.grad.add_(_like_param(param, dw_local, 1.0))


def _fp32_plain(acc: Tensor, dw: Tensor) -> bool:
    """Whether bf16 `dw` goes into `acc` through `braid.ops.grad_cast`: `acc` an fp32 tensor that
    is not a DTensor (a DTensor grad's local rows, as `_add_part` passes them, qualify)."""
    plain = not hasattr(acc, "to_local")
    return plain and acc.dtype == torch.float32 and dw.dtype == torch.bfloat16


def _add_part(param: Tensor, dw_local: Tensor, divide: float, part: Part) -> None:
    """`accumulate_grad` of experts [lo, hi). A new grad is zeros around the part, unless the
    part says it `covers` (its third item, True: the caller delivers every part of the weight in
    this pass, as the pipeline's chunks of experts do): then the grad is allocated unfilled and
    each part's rows are written (the cast, as the plain path's dW), not added to zeros, which
    saves two weight-sized fp32 passes. Such a grad remembers the parts written until it is
    whole (`_braid_written`); a part that finds its rows written (another micro-batch) adds."""
    lo, hi = part[0], part[1]
    grad = param.grad
    if grad is None:
        if len(part) > 2 and part[2]:
            grad = param.grad = torch.empty_like(param)
            grad._braid_written = []  # type: ignore[attr-defined]
        else:
            grad = param.grad = torch.zeros_like(param)
    written = getattr(grad, "_braid_written", None)
    fresh = written is not None and all(hi <= a or b <= lo for a, b in written)
    if divide != 1.0 or torch.promote_types(dw_local.dtype, grad.dtype) != grad.dtype:
        dw_local = cast(dw_local, grad.dtype).div_(divide)
    rows = _local(grad)[lo:hi]
    # Fresh rows are written (casting as it writes: one pass, as the plain path's dW cast),
    # others added; bf16 into fp32 through `braid.ops.grad_cast`'s one vectorized pass.
    if _fp32_plain(rows, dw_local):
        into_fp32(rows, dw_local, add=not fresh)
    else:
        (rows.copy_ if fresh else rows.add_)(dw_local)
    if not fresh:
        return
    written.append((lo, hi))
    if sum(b - a for a, b in written) == _local(grad).shape[0]:
        del grad._braid_written  # whole: later parts add


def deliver_wgrad(
    param: Tensor,
    dw_fn: Callable[..., Tensor],
    divide: float,
    sink: WgradSink | None,
    part: Part | None = None,
    wide: torch.dtype | None = None,
) -> Tensor | None:
    """dW of `param` from `dw_fn()` (the local block, in the GEMM's dtype): returned now, as the
    gradient autograd expects, or (with a `sink`) handed to the overlap scheduler as a task that
    adds it into `param.grad` (`accumulate_grad`), and None returned. dW of a `part` (experts
    [lo, hi) only) is always added into the grad's rows, now or as a task: returned to
    autograd, it would cost a weight-sized zero-filled gradient per part.
    `wide` (`wide_dtype`): `dw_fn(wide)` writes dW in that dtype, asked for where dW becomes
    the grad as it is: returned to autograd, or a task's first grad of a whole weight (a task
    adding into an existing grad reads the narrower dW)."""
    if sink is None and part is None:
        return _like_param(param, cast(dw_fn(wide) if wide else dw_fn(), param.dtype), divide)

    def task() -> None:
        fresh = wide is not None and part is None and param.grad is None
        accumulate_grad(param, dw_fn(wide) if fresh else dw_fn(), divide, part)

    if sink is None:
        task()
    else:
        sink(task)
    return None


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RD, w_EDF, offs_E, impl, wgrad_sink, grad_divide, casts, part, compute):
        # Autocast does not reach grouped_mm: cast to its dtype here, keeping the fp32 master
        # weight as the input so that dW (now or deferred) lands in the parameter's grad.
        # `compute`: the weight already in the GEMM dtype (`train.cast_weights_once`).
        ctx.x_dtype, ctx.w, ctx.grad_divide = x_RD.dtype, w_EDF, grad_divide
        dt = compute_dtype(x_RD)
        x_c = x_RD.to(dt)
        if compute is not None and compute.dtype == dt:
            w_c = compute
        else:
            w_c = cast_weight(w_EDF, dt, casts)
        if part is not None:
            w_c = w_c[part[0] : part[1]]
        ctx.save_for_backward(x_c, w_c, offs_E)
        ctx.impl, ctx.wgrad_sink, ctx.part = impl, wgrad_sink, part
        return gmm(x_c, w_c, offs_E, impl)

    @staticmethod
    def backward(ctx, g_RF):
        x_RD, w_EDF, offs_E = ctx.saved_tensors
        g_RF = g_RF.to(x_RD.dtype).contiguous()  # grouped_mm needs dense strides
        dx = None
        if ctx.needs_input_grad[0]:
            dx = gmm(g_RF, w_EDF.transpose(1, 2), offs_E, ctx.impl).to(ctx.x_dtype)
        dw = None
        if ctx.needs_input_grad[1]:
            impl, sink = ctx.impl, ctx.wgrad_sink
            if ctx.part is None and hasattr(sink, "add_rows"):  # one dW over all chunks' rows
                if sink.add_rows(ctx.w, x_RD, g_RF, offs_E, impl, ctx.grad_divide):
                    return dx, *[None] * 8
                sink = None  # not taken: this chunk's dW goes back to autograd
            dw_fn = lambda dt=None: gmm_wgrad(x_RD, g_RF, offs_E, impl, dt)  # noqa: E731
            wide = wide_dtype(ctx.w, x_RD, g_RF, impl)
            dw = deliver_wgrad(ctx.w, dw_fn, ctx.grad_divide, sink, ctx.part, wide)
        return dx, dw, *[None] * 7


def grouped_linear(
    x_RD: Tensor,
    w_EDF: Tensor,
    offs_E: Tensor,
    impl: str = "grouped",
    wgrad_sink: WgradSink | None = None,
    grad_divide: float = 1.0,
    casts: WeightCasts | None = None,
    part: Part | None = None,
    compute: Tensor | None = None,
) -> Tensor:
    """Differentiable grouped GEMM; see the module docstring for `wgrad_sink` (and
    `cast_weight` for `casts`). With `part` = (lo, hi), the rows use experts [lo, hi) of the
    weight's local block (offs_E has hi - lo entries) and their dW goes into those rows of the
    grad (`deliver_wgrad`). `compute` is `w_EDF` already in the GEMM dtype, used instead of a
    cast (`braid.train.weight_cast`: cast once per optimizer step); dW still goes to `w_EDF`."""
    return _GroupedLinear.apply(
        x_RD, w_EDF, offs_E, impl, wgrad_sink, grad_divide, casts, part, compute
    )
