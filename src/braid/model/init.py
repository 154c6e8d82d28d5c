"""Weight initialisation that does not depend on the parallel layout.

Every parameter is drawn from its own generator, seeded by (seed, parameter name), and each
routed expert from (seed, name, global expert id). So a model sharded over any number of ranks
holds exactly the weights the single-process model holds. `assign(param, full)` writes a full
tensor into a parameter; `braid.parallel` passes one that keeps only the local shard of a DTensor.

Scheme (GPT-2 / Megatron): normal(0, std) everywhere, output projections of each residual branch
(attention wo, FFN/expert w2) scaled by 1/sqrt(2 * n_layers); norms start at one.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from braid.moe.experts import GroupedExperts

Assign = Callable[[Tensor, Tensor], None]


def _plain_assign(param: Tensor, full: Tensor) -> None:
    param.copy_(full)


def _normal(shape, std: float, seed: int, key: str, device, dtype) -> Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))
    return torch.empty(shape, device=device, dtype=dtype).normal_(0.0, std, generator=gen)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, std: float, n_layers: int,
                 assign: Assign = _plain_assign) -> None:
    resid_std = std / math.sqrt(2 * n_layers)
    experts = {f"{n}.": m for n, m in model.named_modules() if isinstance(m, GroupedExperts)}
    for name, p in model.named_parameters():
        shape = p.shape  # a DTensor reports its global shape
        device = p.device if p.device.type != "meta" else torch.device("cpu")
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("norm.weight"):
            assign(p, torch.ones(shape, device=device, dtype=p.dtype))
            continue
        is_resid_out = leaf == "w2" or name.endswith(("wo.weight", "w2.weight"))
        s = resid_std if is_resid_out else std
        owner = next((m for prefix, m in experts.items() if name.startswith(prefix)), None)
        if owner is not None:
            # One generator per global expert id: identical weights under any sharding.
            rows = [
                _normal(shape[1:], s, seed, f"{name}#{owner.expert_offset + e}", device, p.dtype)
                for e in range(shape[0])
            ]
            assign(p, torch.stack(rows))
        else:
            assign(p, _normal(shape, s, seed, name, device, p.dtype))
    for m in model.modules():
        if hasattr(m, "expert_bias"):
            m.expert_bias.zero_()
