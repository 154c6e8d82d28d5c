"""Routed experts: E SwiGLU FFNs evaluated as two grouped GEMMs over rows grouped by expert.

Weights are stored stacked: w13 [L, D, 2F] (gate and up fused) and w2 [L, F, D], where L is the
number of experts on this rank (all E in one process; E/ep under expert parallelism, set by
`braid.parallel`). `expert_offset` is the global id of local expert 0 and `num_experts` the
number of local experts (used by init so that a given expert gets the same weights whatever the
layout). Under `braid.parallel` the weights are DTensors of global shape [E, ...] sharded over
the expert-parallel ranks; the GEMMs run on the local block, which holds experts
[expert_offset, expert_offset + num_experts). `grad_divide` (set by `braid.parallel` where no
FSDP unit averages the experts' grads) divides their weight gradients.
With `fp8_stats` set (`train.precision=fp8`, by `braid.parallel.fp8`) the FFN runs in fp8
(`braid.ops.fp8_experts`, its quantisers fused with the SwiGLU); the rows may then arrive
already quantised (`Fp8Rows`, from a dispatcher that sent fp8), and the first GEMM consumes
their codes and scales directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from braid.ops.fp8_experts import fp8_swiglu_experts
from braid.ops.fp8_gemm import Fp8Rows
from braid.ops.fp8_stats import Fp8Stats
from braid.ops.grouped_gemm import (
    Part,
    WeightCasts,
    WgradSink,
    counts_to_offsets,
    grouped_linear,
)
from braid.ops.swiglu import swiglu


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, dim: int, hidden: int, impl: str = "grouped"):
        super().__init__()
        self.num_experts, self.dim, self.hidden, self.impl = num_experts, dim, hidden, impl
        self.expert_offset = 0
        self.grad_divide = 1.0
        self.fp8_stats: Fp8Stats | None = None  # not None: GEMMs in fp8 (braid.parallel.fp8)
        self.fp8_name = "experts"
        self.fp8_wgrad = False  # dW in fp8 as well (train.fp8_wgrad)
        self._casts: WeightCasts | None = None  # set inside `shared_casts()`
        # bf16 copies of w13 / w2 cast once per optimizer step (`braid.train.weight_cast`), used
        # instead of a cast in every forward; the fp32 weights stay the parameters and get dW.
        self.w13_compute: Tensor | None = None
        self.w2_compute: Tensor | None = None
        self.w13 = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))

    def forward(
        self,
        x_RD: Tensor | Fp8Rows,
        counts_L: Tensor,
        wgrad_sink: WgradSink | None = None,
        part: Part | None = None,
    ) -> Tensor:
        """Rows grouped by local expert (`counts_L` per expert) through their experts. With
        `part` = (lo, hi) the rows are those of local experts [lo, hi) only (a pipeline chunk
        of experts; `counts_L` then has hi - lo entries), and so are the weight grads."""
        offs, div = counts_to_offsets(counts_L), self.grad_divide
        if self.fp8_stats is not None:
            return self._forward_fp8(x_RD, offs, wgrad_sink, part)
        casts, impl, c13, c2 = self._casts, self.impl, self.w13_compute, self.w2_compute
        h_RF2 = grouped_linear(x_RD, self.w13, offs, impl, wgrad_sink, div, casts, part, c13)
        y = swiglu(h_RF2)
        return grouped_linear(y, self.w2, offs, impl, wgrad_sink, div, casts, part, c2)

    @contextmanager
    def shared_casts(self) -> Iterator[None]:
        """Within the block, every call casts (or, in fp8, quantises) each expert weight once:
        the chunked pipeline calls the experts once per chunk, and its chunks then share one
        copy of the weights in the GEMM dtype, also in what autograd keeps for backward."""
        if self._casts is not None:  # already inside a block: share its casts
            yield
            return
        casts = self._casts = {}
        try:
            yield
        finally:
            casts.clear()  # (fp8 backward reuses the emptied dict for its own codes)
            self._casts = None

    def _forward_fp8(
        self, x_RD: Tensor | Fp8Rows, offs: Tensor, sink: WgradSink | None, part: Part | None
    ) -> Tensor:
        stats = self.fp8_stats  # the fp8 GEMMs run eagerly, also under torch.compile
        pre = None
        if isinstance(x_RD, Fp8Rows):
            pre, x_RD = (x_RD.q_RD, x_RD.s_R1), x_RD.anchor_RD
        return fp8_swiglu_experts(
            x_RD, self.w13, self.w2, offs, self.impl, sink, self.grad_divide, pre, stats,
            self.fp8_name, self.fp8_wgrad, self._casts, part,
        )  # fmt: skip

    def shard(self, rank: int, size: int) -> None:
        """Keep only experts [rank*L, (rank+1)*L) of the global E (called by braid.parallel)."""
        L = self.num_experts // size
        self.expert_offset = rank * L
        self.num_experts = L
        for name in ("w13", "w2"):
            full = getattr(self, name)
            setattr(self, name, nn.Parameter(full.detach()[rank * L : (rank + 1) * L].clone()))
