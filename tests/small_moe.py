"""A small MoE layer with seeded weights, and one forward + backward through it, for the tests
that compare a layer's paths (plain, chunked, simulated exchange) against each other.

The weights are redrawn far from init's (0.3 * N(0, 1), every parameter from one generator in
`parameters()` order), so routing is decisive and a misrouted row shows in every output.
"""

from __future__ import annotations

import torch

from braid.model.config import ModelConfig
from braid.moe.config import MoEConfig
from braid.moe.layer import MoE

# The layer most of these tests share: 4 experts of 12, top-2; tests override any field.
SMALL_MOE = {"num_experts": 4, "top_k": 2, "expert_hidden": 12}


def seeded_moe(seed: int | torch.Generator = 0, dim: int = 16, **cfg) -> MoE:
    """MoE(ModelConfig(dim=dim), MoEConfig(**SMALL_MOE, **cfg)) with every parameter drawn as
    0.3 * N(0, 1) from `seed` (a generator is drawn from and left advanced, for the caller's
    data)."""
    moe = MoE(ModelConfig(dim=dim), MoEConfig(**{**SMALL_MOE, **cfg}))
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return moe


def moe_step(moe: MoE, x: torch.Tensor) -> list[torch.Tensor]:
    """Forward and backward of sum(y^2) + aux loss: [y, x's grad, tokens dropped, then every
    parameter's grad]."""
    x = x.clone().requires_grad_()
    y, stats = moe(x)
    (y.square().sum() + stats.aux_loss).backward()
    return [y.detach(), x.grad, stats.num_dropped] + [p.grad for p in moe.parameters()]
