"""Data parallelism with FSDP2: experts over their dp peers, dense weights over all ranks.

`apply_data_parallel(model, cfg, ctx)` runs after expert parallelism, on the meta device:
  1. each MoE layer's experts: `fully_shard` over the mesh's "dp" dimension (the ranks that hold
     the same experts). Their weights are already DTensors sharded over "ep", so FSDP2 makes
     them 2-D (dp, ep) DTensors. Gradient scaling: every rank's loss is its local mean and the
     objective is the mean over all `world` ranks; an expert's gradient already sums the
     contributions of its EP group's tokens (the all-to-all backward), so the reduction over
     dp must divide by dp * ep = world, not dp (torchtitan: `set_gradient_divide_factor`).
     With dp = 1 there is nothing to shard or reduce: the experts stay plain DTensor parameters
     (no FSDP unit) whose grads the GEMM divides by world (`GroupedExperts.grad_divide`). Then
     nothing reduces their grads when they reach the experts' input, so the overlap engine may
     defer their dW into the exchange windows (`overlap.split_dw`, docs/overlap.md; with dp > 1
     the engine holds the expert unit's reduce-scatter until that dW has run instead);
  2. dense weights (parallel.dense): `fully_shard` of each block and MTP module (and of the
     embedding and head when untied, `fsdp_units`), then of the root, over the flattened world
     mesh (fsdp), or FSDP2's `replicate` (an all-reduce per block, weights
     whole on every rank). Both average gradients over the world, the right scale for
     dense weights; experts are left to their own groups from step 1. With
     `overlap.split_dw = "all"` the engine holds a block unit's reduction until the attention /
     dense-FFN dW it deferred into an MoE layer below has run (docs/overlap.md, FSDP).
With parallel.param_dtype = "bf16", every FSDP unit (experts and dense) gets FSDP2's
MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): the sharded parameters stay fp32 (the
master copy that AdamW updates, with fp32 grads and moments, all sharded), the all-gather
carries and the forward/backward compute with bf16 copies, and gradients are reduced in fp32.
Unit inputs are cast to bf16 (FSDP2's cast_forward_inputs), so the residual stream is bf16 too
(torchtitan's default). Experts that are no FSDP unit (dp = 1) keep fp32 weights; their grouped
GEMMs cast to the input's dtype.
On gloo (CPU) reductions are forced to SUM followed by a division, because gloo has no AVG or
PREMUL_SUM. `assign_full` is the `assign` of `braid.model.init` for sharded parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from braid.config import Config
from braid.moe.layer import MoE
from braid.parallel.mesh import ParallelContext, expert_shard_dim


def apply_data_parallel(model: nn.Module, cfg: Config, ctx: ParallelContext) -> None:
    dp_mesh, world_mesh = ctx.mesh["dp"], ctx.world_mesh
    # gloo (CPU) has no AVG/PREMUL_SUM: reduce with SUM and divide after. Never on a one-rank
    # group, where torch 2.13 would divide twice (in the copy that stands in for the
    # reduce-scatter, and again after it).
    sum_only = ctx.device.type == "cpu"
    mp = MixedPrecisionPolicy()  # FSDP2's default: compute in the parameters' own dtype
    if cfg.parallel.param_dtype == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    expert_params: set[nn.Parameter] = set()
    for moe in (m for m in model.modules() if isinstance(m, MoE)):  # 1.
        L = moe.experts.num_experts

        def placement(p: nn.Parameter, L: int = L) -> Shard:
            return Shard(expert_shard_dim(L, p.shape[1], ctx.dp))

        expert_params |= set(moe.experts.parameters())
        if ctx.dp == 1:
            moe.experts.grad_divide = float(ctx.world)
            continue
        fully_shard(moe.experts, mesh=dp_mesh, shard_placement_fn=placement, mp_policy=mp)
        moe.experts.set_gradient_divide_factor(float(ctx.world))
        moe.experts.set_force_sum_reduction_for_comms(sum_only)
    units: list[FSDPModule] = []
    # Experts that are no FSDP unit of their own (dp = 1) stay out of the dense units.
    ignored = expert_params if ctx.dp == 1 else None
    if cfg.parallel.dense == "fsdp":  # 2.
        units += [
            fully_shard(u, mesh=world_mesh, ignored_params=ignored, mp_policy=mp)
            for u in fsdp_units(model)
        ]
        units.append(fully_shard(model, mesh=world_mesh, ignored_params=ignored, mp_policy=mp))
    else:
        from torch.distributed._composable.replicate_with_fsdp import replicate

        for block in model.units():
            ignored = {p for p in block.parameters() if p in expert_params}
            units.append(replicate(block, mesh=world_mesh, ignored_params=ignored, mp_policy=mp))
        units.append(replicate(model, mesh=world_mesh, ignored_params=expert_params, mp_policy=mp))
    for unit in units:
        unit.set_force_sum_reduction_for_comms(sum_only)


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The dense FSDP units under the root, in order: each block, each MTP module, and with an
    untied head the embedding and the head on their own (torchtitan's layout), so the root
    never gathers both vocabulary matrices at once (1.9B elements for dsv3). A tied matrix
    stays in the root: the head reads it outside the embedding's forward."""
    units = list(model.units())
    if model.output is not None:
        units += [model.tok_emb, model.output]
    return units


def assign_full(param: Tensor, value: Tensor, row: int | None = None) -> None:
    """Write `value` into the parameter's global tensor (all of it, or its dim-0 slice `row`),
    keeping only what this rank holds. No communication: every rank computes its own part."""
    if not isinstance(param, DTensor):
        (param if row is None else param[row]).copy_(value)
        return
    local = param.to_local()
    shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements
    )
    if local.numel() == 0:
        return  # FSDP padding: this rank holds no rows of this parameter
    box = tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))
    if row is None:
        local.copy_(value[box])
    elif box[0].start <= row < box[0].stop:
        local[row - box[0].start].copy_(value[box[1:]])
