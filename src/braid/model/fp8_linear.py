"""`Fp8Linear`: an `nn.Linear` whose GEMMs run in fp8 (`braid.ops.fp8_gemm`).

A plain subclass with the same parameters, so `braid.parallel.fp8` swaps it in by changing a
module's class: parameter names, state-dict keys, init and FSDP wrapping are untouched, and
weights stay in full precision (only the GEMM operands are quantised, per call).
Inside compiled code the GEMMs are one operator (`braid.ops.fp8_linear_op`, no graph break),
except while `fp8_stats` records (the last step of a log interval): then the eager Function
runs behind a graph break, so the stats see every operand (a second compiled variant of the
block, guarded on `active`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from braid.ops.fp8_gemm import fp8_linear
from braid.ops.fp8_linear_op import fp8_linear_traced
from braid.ops.fp8_stats import Fp8Stats


class Fp8Linear(nn.Linear):
    fp8_stats: Fp8Stats | None = None  # set with the swap; recorded while active (eager frame)
    fp8_name: str = ""
    fp8_wgrad: bool = False  # dW in fp8 too (train.fp8_wgrad)

    def forward(self, x: Tensor) -> Tensor:
        stats = self.fp8_stats
        if torch.compiler.is_compiling() and (stats is None or not stats.active):
            y = fp8_linear_traced(x, self.weight, self.fp8_wgrad)
        else:
            y = self._eager(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @torch.compiler.disable  # traced, the name would be guarded: a recompile per module
    def _eager(self, x: Tensor) -> Tensor:
        return fp8_linear(x, self.weight, self.fp8_stats, self.fp8_name, self.fp8_wgrad)
