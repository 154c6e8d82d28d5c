"""Expert parallelism: each rank of an EP group keeps E/ep experts and gets an exchange installed.

`apply_expert_parallel(model, cfg, ctx)` runs on the meta-device model, before data
parallelism. For every MoE layer it
  1. keeps this rank's experts [ep_rank*L, (ep_rank+1)*L), L = E/ep (`GroupedExperts.shard`),
     and turns each expert weight into a DTensor of GLOBAL shape [E, ...] placed Shard(0) over
     the mesh's "ep" dimension. The experts' forward runs on the local block; the state dict
     names every expert by its global index, which is what makes checkpoints reshardable
     (DCP reads any (dp, ep) layout into any other, or into one process);
  2. installs the exchange named by `exchange.algorithm`, built over this rank's EP group and
     the world group (router statistics are summed over the whole global batch).
With ep = 1 (pure data parallelism) the EP group has one rank: nothing moves, but the router
statistics are still global, so every layout computes the same routing losses.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import DTensor, Shard

from braid.config import Config
from braid.exchange import get_exchange
from braid.moe.layer import MoE
from braid.parallel.mesh import ParallelContext


def apply_expert_parallel(model: nn.Module, cfg: Config, ctx: ParallelContext) -> None:
    ep_mesh = ctx.mesh["ep"]
    exchange_cls = get_exchange(cfg.exchange.algorithm)
    ep_group, world_group = ep_mesh.get_group(), ctx.world_mesh.get_group()
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        experts = moe.experts
        experts.shard(ctx.ep_rank, ctx.ep)  # 1. plain [L, ...] blocks (no memory on meta)
        for name in ("w13", "w2"):
            local = getattr(experts, name).detach()
            # run_check=False: no communication; every rank's block has the same shape.
            glob = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)
            setattr(experts, name, nn.Parameter(glob))
        moe.dispatcher.exchange = exchange_cls(ep_group, world_group, cfg.exchange)  # 2.
