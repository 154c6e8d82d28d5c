"""`Fp8Linear`: an `nn.Linear` whose GEMMs run in fp8 (`braid.ops.fp8_gemm`).

A plain subclass with the same parameters, so `braid.parallel.fp8` swaps it in by changing a
module's class: parameter names, state-dict keys, init and FSDP wrapping are untouched, and
weights stay in full precision (only the GEMM operands are quantised, per call).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from braid.ops.fp8_gemm import fp8_linear
from braid.ops.fp8_stats import Fp8Stats


class Fp8Linear(nn.Linear):
    fp8_stats: Fp8Stats | None = None  # set with the swap; recorded while active (eager frame)
    fp8_name: str = ""
    fp8_wgrad: bool = False  # dW in fp8 too (train.fp8_wgrad)

    @torch.compiler.disable  # one graph break per call; tracing it recompiled per module
    def forward(self, x: Tensor) -> Tensor:
        y = fp8_linear(x, self.weight, self.fp8_stats, self.fp8_name, self.fp8_wgrad)
        return y if self.bias is None else y + self.bias.to(y.dtype)
