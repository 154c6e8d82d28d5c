"""Global gradient-norm clipping over every parameter, whatever mesh its gradient lives on.

Distributed, gradients are DTensors on different meshes (dense on the world mesh, experts on
(dp, ep)), so the norm is assembled by hand: each rank sums the squares of its local shards,
dividing a shard that is replicated over some mesh dimensions by its number of copies (so every
element counts exactly once), then one all-reduce over the world gives the global sum of
squares, identical on every rank. One process takes the same path without the all-reduce.

Squares are summed with `square().sum()` (a cascade sum): torch.linalg.vector_norm and
torch.dot in fp32 on CPU drift by 1e-6 to 1e-3 relative on large tensors, which would make
clipping itself differ between layouts.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from braid.parallel.mesh import ParallelContext


@torch.no_grad()
def clip_grad_norm(
    model: nn.Module,
    max_norm: float,
    ctx: ParallelContext | None = None,
    sums_out: list[Tensor] | None = None,
) -> Tensor:
    """Clip all gradients to a global L2 norm of `max_norm` (0: only measure); return the norm.
    `sums_out`, if given, receives each local gradient's sum of squares (parameters in
    `model.parameters()` order, those without a gradient left out), before any clipping."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    distributed = ctx is not None and ctx.distributed
    if not grads and not distributed:
        return torch.zeros(())
    local = [_local(g) for g in grads]
    device = ctx.device if ctx is not None else local[0].device
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for g, lg in zip(grads, local, strict=True):
        part = lg.float().square().sum()
        if sums_out is not None:
            sums_out.append(part)
        sq += part / _copies(g, ctx) if distributed else part
    if distributed:
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=ctx.world_mesh.get_group())
    norm = sq.sqrt()
    if max_norm > 0 and local:
        torch._foreach_mul_(local, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm


def _local(g: Tensor) -> Tensor:
    return g.to_local() if hasattr(g, "to_local") else g


def _copies(g: Tensor, ctx: ParallelContext) -> int:
    """How many ranks hold this same shard (a plain tensor is taken as replicated everywhere)."""
    if not hasattr(g, "placements"):
        return ctx.world
    mesh = g.device_mesh
    return math.prod(mesh.size(i) for i, p in enumerate(g.placements) if p.is_replicate())
