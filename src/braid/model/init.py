"""Weight initialisation that does not depend on the parallel layout.

Every parameter is drawn from its own generator, seeded by (seed, parameter name), and each
routed expert from (seed, name, global expert id). So a model sharded over any number of ranks
holds exactly the weights the single-process model holds. `assign(param, value, row)` writes
`value` into the parameter's global (logical) tensor: all of it when `row` is None, else the
slice `[row]` along dim 0 (one routed expert). The default writes a plain tensor;
`braid.parallel` passes one that keeps only the local shard of a DTensor. Each rank draws only
the experts it holds (`GroupedExperts.expert_offset`/`num_experts`), one expert at a time, so
no rank ever materialises all experts of a layer.

Scheme (GPT-2 / Megatron): normal(0, std) everywhere, output projections of each residual branch
(attention wo, FFN/expert w2) scaled by 1/sqrt(2 * n_layers); norms (including qk-norm and
MLA's q_norm/kv_norm) start at one, projection biases at zero.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from braid.moe.experts import GroupedExperts

Assign = Callable[[Tensor, Tensor, "int | None"], None]


def _plain_assign(param: Tensor, value: Tensor, row: int | None = None) -> None:
    (param if row is None else param[row]).copy_(value)


def _normal(shape, std: float, seed: int, key: str, device, dtype) -> Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))
    return torch.empty(shape, device=device, dtype=dtype).normal_(0.0, std, generator=gen)


@torch.no_grad()
def init_weights(
    model: nn.Module, seed: int, std: float, n_layers: int, assign: Assign = _plain_assign
) -> None:
    resid_std = std / math.sqrt(2 * n_layers)
    experts = {f"{n}.": m for n, m in model.named_modules() if isinstance(m, GroupedExperts)}
    for name, p in model.named_parameters():
        shape = p.shape  # a DTensor reports its global shape
        device = p.device if p.device.type != "meta" else torch.device("cpu")
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("norm.weight"):
            assign(p, torch.ones(shape, device=device, dtype=p.dtype), None)
            continue
        if leaf == "bias":  # projection biases (qkv_bias) start at zero
            assign(p, torch.zeros(shape, device=device, dtype=p.dtype), None)
            continue
        is_resid_out = leaf == "w2" or name.endswith(("wo.weight", "w2.weight"))
        s = resid_std if is_resid_out else std
        owner = next((m for prefix, m in experts.items() if name.startswith(prefix)), None)
        if owner is not None:
            # One generator per global expert id: identical weights under any sharding. A plain
            # parameter holds just the local experts; a DTensor reports the global shape, so
            # its rows are global expert ids.
            first = 0 if shape[0] == owner.num_experts else owner.expert_offset
            for e in range(owner.num_experts):
                gid = owner.expert_offset + e
                row = _normal(shape[1:], s, seed, f"{name}#{gid}", device, p.dtype)
                assign(p, row, first + e)
        else:
            assign(p, _normal(shape, s, seed, name, device, p.dtype), None)
    for m in model.modules():
        if hasattr(m, "expert_bias"):
            m.expert_bias.zero_()
