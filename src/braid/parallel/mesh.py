"""Process layout: world, rank, device, and (under torchrun) the DeviceMesh with dp and ep.

This module is the only place that does rank arithmetic; it imports nothing of torch.distributed
(`braid.parallel.distributed.init_parallel` builds the context, and without torchrun returns a
one-process one without touching torch.distributed).

Layout of `world` ranks as a (dp, ep) mesh, row-major: rank = dp_index * ep + ep_index. An
expert-parallel group is `ep` consecutive ranks, so with ep <= GPUs per node the all-to-all
stays inside a node (NVLink); the dp peers of an expert sit at stride ep. Dense weights are
data-parallel over the flattened ("world") mesh, experts over their "dp" dimension.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from braid.config import Config
from braid.errors import BraidError
from braid.knobs import check


@dataclass
class ParallelContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    ep: int = 1
    mesh: Any = None  # DeviceMesh ("dp", "ep") when distributed
    world_mesh: Any = None  # the same ranks flattened to one dimension ("world")
    owns_process_group: bool = False  # init_distributed created it, so `shutdown` ends it
    local_world: int = 1  # ranks on this node (torchrun's LOCAL_WORLD_SIZE)

    @property
    def dp(self) -> int:
        return self.world // self.ep

    @property
    def distributed(self) -> bool:
        return self.world > 1 or self.mesh is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ep_rank(self) -> int:
        """This rank's index in its expert-parallel group (it owns experts ep_rank*E/ep ...)."""
        return self.rank % self.ep


def pick_device(cfg: Config, local_rank: int = 0) -> torch.device:
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise BraidError("train.device='cuda' but no CUDA device is visible; use cpu or auto")
        if local_rank >= torch.cuda.device_count():
            raise BraidError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
                "launch at most that many processes per node (torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def check_layout(cfg: Config, world: int) -> None:
    """Refuse a (world, ep, batch) combination that cannot be laid out, with the fix."""
    ep, tc = cfg.parallel.ep, cfg.train
    check(
        world % ep == 0,
        "parallel.ep",
        ep,
        f"must divide the world size {world} (dp = world/ep ranks hold each expert); "
        f"use one of {', '.join(str(d) for d in _divisors(world))}",
    )
    check(
        ep == 1 or cfg.moe.num_experts > 0,
        "parallel.ep",
        ep,
        "needs routed experts (moe.num_experts=0 makes every layer dense); use parallel.ep=1",
    )
    check(
        tc.batch_size % (world * tc.grad_accum) == 0,
        "train.batch_size",
        tc.batch_size,
        f"must be divisible by world_size*train.grad_accum = {world}*{tc.grad_accum} "
        "(every rank reads an equal slice of each micro-batch)",
    )


def expert_shard_dim(num_local: int, dim1: int, dp: int) -> int:
    """Dimension along which FSDP shards an expert weight [L, dim1, ...] over its dp peers.

    Dim 0 (whole experts) when the L local experts split evenly; otherwise dim 1 if that splits
    evenly, so e.g. one expert per rank is still spread over all dp peers instead of landing on
    the first (torchtitan does the same); else dim 0 with FSDP's padding."""
    if num_local % dp == 0 or dim1 % dp != 0:
        return 0
    return 1


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
