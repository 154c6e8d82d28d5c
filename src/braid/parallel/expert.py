"""Expert parallelism: each rank of an EP group keeps E/ep experts; one exchange serves them all.

`apply_expert_parallel(model, cfg, ctx)` runs on the meta-device model, before data
parallelism. It
  1. keeps, in every MoE layer, this rank's experts [ep_rank*L, (ep_rank+1)*L), L = E/ep
     (`GroupedExperts.shard`), and turns each expert weight into a DTensor of GLOBAL shape
     [E, ...] placed Shard(0) over the mesh's "ep" dimension. The experts' forward runs on the
     local block; the state dict names every expert by its global index, which is what makes
     checkpoints reshardable (DCP reads any (dp, ep) layout into any other, or into one process);
  2. builds ONE exchange, named by `exchange.algorithm`, over this rank's EP group and the world
     group (router statistics are summed over the whole global batch), and installs that same
     object in every MoE layer: `hierarchical` creates its sub-group communicators once,
     `symmetric` allocates one set of symmetric buffers (not one per layer), and `auto` times
     its candidates once per model. With `auto`, rank 0 prints the choice on stderr when it is
     made (`watch_exchange_choice` lets the trainer record it too).
Sharing is safe: every rank issues the movements of all layers in the same order (layer by
layer; chunk by chunk in the overlap pipeline, which keeps several in flight within a layer),
and each exchange keeps in-flight movements apart: `nccl` and `hierarchical` hold all of a
movement's state in its handle; `symmetric` reuses one receive buffer and counts table, but runs
its movements in issue order on its own stream, and its barriers order every write into a
peer's buffer after that peer has copied the previous movement out (see symmetric.py); `auto`
delegates to the one exchange it chose.
With ep = 1 (pure data parallelism) the EP group has one rank: nothing moves, but the router
statistics are still global, so every layout computes the same routing losses.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable

from torch import nn
from torch.distributed.tensor import DTensor, Shard

from braid.config import Config
from braid.exchange import get_exchange
from braid.exchange.auto import AutoChoice, find_auto
from braid.moe.layer import MoE
from braid.parallel.mesh import ParallelContext


def apply_expert_parallel(model: nn.Module, cfg: Config, ctx: ParallelContext) -> None:
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if not moes:
        return
    ep_mesh = ctx.mesh["ep"]
    # 2. one exchange for the whole model (built before the loop: it may create groups), with
    # the topology of this context: node_size 0 means this node's ranks (that share the EP group).
    xcfg = cfg.exchange
    if xcfg.node_size == 0:
        xcfg = dataclasses.replace(xcfg, node_size=math.gcd(ctx.local_world, ctx.ep))
    build = get_exchange(xcfg.algorithm, allow_import=False)  # imported by the config's validation
    exchange = build(ep_mesh.get_group(), ctx.world_mesh.get_group(), xcfg)
    auto = find_auto(exchange)
    if auto is not None and ctx.is_main:
        auto.watch(lambda choice: print(choice.line(), file=sys.stderr, flush=True))
    for moe in moes:
        experts = moe.experts
        experts.shard(ctx.ep_rank, ctx.ep)  # 1. plain [L, ...] blocks (no memory on meta)
        for name in ("w13", "w2"):
            local = getattr(experts, name).detach()
            # run_check=False: no communication; every rank's block has the same shape.
            glob = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)
            setattr(experts, name, nn.Parameter(glob))
    install_exchange(model, exchange)  # 2. the same object in every layer


def install_exchange(model: nn.Module, exchange) -> None:
    """Put ONE exchange object in every MoE layer's dispatcher."""
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        moe.dispatcher.exchange = exchange


def watch_exchange_choice(model: nn.Module, fn: Callable[[AutoChoice], None]) -> None:
    """Call `fn(choice)` once the model's `auto` exchange has chosen (at once if it has); a
    no-op for every other exchange (and for a model without MoE layers)."""
    moe = next((m for m in model.modules() if isinstance(m, MoE)), None)
    auto = find_auto(moe.dispatcher.exchange) if moe is not None else None
    if auto is not None:
        auto.watch(fn)
