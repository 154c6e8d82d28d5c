"""Small building blocks: RMSNorm and the SwiGLU feed-forward (rotary embeddings: rope.py).

Shape legend: B batch, T time (tokens), D model dim, H heads, K kv heads, Dh head dim, F ffn dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from braid.model.rope import apply_rope, plain_rope_table
from braid.ops.swiglu import SwiGLU as SwiGLU  # re-exported: the model's FFN

# Kept importable from here: rope_table(rot, max_len, theta) is the unscaled table.
rope_table = plain_rope_table
__all__ = ["RMSNorm", "SwiGLU", "apply_rope", "rope_table"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # A bf16 input (the residual stream with model.residual = "compute", q and k under
        # autocast) meets its weight in bf16, as under FSDP's bf16 parameters: one fused kernel
        # (the fp32 weight would send rms_norm to its unfused path).
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)
