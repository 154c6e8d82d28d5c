"""Routed experts: E SwiGLU FFNs evaluated as two grouped GEMMs over rows grouped by expert.

Weights are stored stacked: w13 [L, D, 2F] (gate and up fused) and w2 [L, F, D], where L is the
number of experts on this rank (all E in one process; E/ep under expert parallelism, set by
`braid.parallel`). `expert_offset` is the global id of local expert 0 and `num_experts` the
number of local experts (used by init so that a given expert gets the same weights whatever the
layout). Under `braid.parallel` the weights are DTensors of global shape [E, ...] sharded over
the expert-parallel ranks; the GEMMs run on the local block, which holds experts
[expert_offset, expert_offset + num_experts). `grad_divide` (set by `braid.parallel` where no
FSDP unit averages the experts' grads) divides their weight gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from braid.ops.grouped_gemm import WgradSink, counts_to_offsets, grouped_linear
from braid.ops.swiglu import swiglu


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, dim: int, hidden: int, impl: str = "grouped"):
        super().__init__()
        self.num_experts, self.dim, self.hidden, self.impl = num_experts, dim, hidden, impl
        self.expert_offset = 0
        self.grad_divide = 1.0
        self.w13 = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))

    def forward(
        self, x_RD: Tensor, counts_L: Tensor, wgrad_sink: WgradSink | None = None
    ) -> Tensor:
        offs, div = counts_to_offsets(counts_L), self.grad_divide
        h_RF2 = grouped_linear(x_RD, self.w13, offs, self.impl, wgrad_sink, div)
        return grouped_linear(swiglu(h_RF2), self.w2, offs, self.impl, wgrad_sink, div)

    def shard(self, rank: int, size: int) -> None:
        """Keep only experts [rank*L, (rank+1)*L) of the global E (called by braid.parallel)."""
        L = self.num_experts // size
        self.expert_offset = rank * L
        self.num_experts = L
        for name in ("w13", "w2"):
            full = getattr(self, name)
            setattr(self, name, nn.Parameter(full.detach()[rank * L : (rank + 1) * L].clone()))
