"""torch.distributed plumbing: start (or join) the process group, build the mesh, small collectives.

`init_parallel(cfg)`: one process, or under torchrun (RANK/WORLD_SIZE/LOCAL_RANK in the
environment) `init_distributed(cfg)`. That creates the process group itself (NCCL on GPU, gloo
on CPU) unless one is already initialised, in which case it joins that one (tests spawn gloo
ranks themselves) and leaves its teardown to whoever made it. Every collective here takes the
context explicitly: no module-global process-group state.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from braid.config import Config
from braid.errors import BraidError
from braid.exchange.nccl import group_options
from braid.parallel.mesh import ParallelContext, check_layout, pick_device


def init_distributed(cfg: Config) -> ParallelContext:
    """The context of this rank: process group, (dp, ep) mesh and its flattened world mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg, local_rank)
    owns = not dist.is_initialized()
    if owns:
        world = int(os.environ["WORLD_SIZE"])
        check_layout(cfg, world)  # before any rendezvous: a bad layout fails on every rank alike
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            device_id=device if device.type == "cuda" else None,
            timeout=datetime.timedelta(minutes=cfg.parallel.timeout_min),
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    check_layout(cfg, world)
    ep = cfg.parallel.ep
    # Row-major (dp, ep): an EP group is ep consecutive ranks, i.e. inside a node first.
    # exchange.high_priority: the EP groups' NCCL streams at high priority (nccl.group_options)
    options = group_options(cfg.exchange, dist.get_backend())
    override = None if options is None else {"ep": ("nccl", options)}
    mesh = init_device_mesh(
        device.type, (world // ep, ep), mesh_dim_names=("dp", "ep"), backend_override=override
    )
    world_mesh = mesh["dp", "ep"]._flatten("world")
    return ParallelContext(
        rank=rank,
        world=world,
        local_rank=local_rank,
        device=device,
        ep=ep,
        mesh=mesh,
        world_mesh=world_mesh,
        owns_process_group=owns,
        # The topology exchanges need (hierarchical, symmetric) comes from here, not from
        # their own reading of the environment.
        local_world=int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
        or torch.cuda.device_count()
        or world,
    )


def init_parallel(cfg: Config) -> ParallelContext:
    """One process, or the torchrun group described by the environment."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        if cfg.parallel.ep != 1:
            raise BraidError(
                f"parallel.ep={cfg.parallel.ep} needs that many processes: launch with "
                f"torchrun --nproc_per_node={cfg.parallel.ep} -m braid train ..."
            )
        return ParallelContext(rank=0, world=1, local_rank=0, device=pick_device(cfg))
    return init_distributed(cfg)


def shutdown(ctx: ParallelContext) -> None:
    """End the process group if `init_distributed` created it (a no-op otherwise)."""
    if ctx.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def world_group(ctx: ParallelContext) -> Any:
    return ctx.world_mesh.get_group()


def all_reduce_mean(t: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Mean of `t` over all ranks (a copy; `t` itself is unchanged). Identity in one process."""
    if not ctx.distributed:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=world_group(ctx))
    return out / ctx.world


def broadcast_object(obj: Any, ctx: ParallelContext) -> Any:
    """Rank 0's `obj` on every rank (identity in one process)."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=world_group(ctx))
    return box[0]


def first_error(err: BaseException | None, ctx: ParallelContext) -> BaseException | None:
    """The first failing rank's error on every rank, of the same BraidError class (other
    exceptions come back as BraidError with their message); `err` itself in one process."""
    from braid.errors import BraidError

    if not ctx.distributed:
        return err
    mine = None
    if err is not None:
        mine = (type(err) if isinstance(err, BraidError) else BraidError, str(err))
    box: list[Any] = [None] * ctx.world
    dist.all_gather_object(box, mine, group=world_group(ctx))
    first = next((m for m in box if m is not None), None)
    if first is None:
        return None
    try:
        return first[0](first[1])
    except TypeError:  # a class built from other arguments (ConfigError): keep the message
        return BraidError(first[1])


def raise_on_any(err: BaseException | None, ctx: ParallelContext) -> None:
    """Raise the first failing rank's error on every rank, so that no rank goes on into a
    collective that the failed one never joins."""
    if (found := first_error(err, ctx)) is not None:
        raise found
