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
        # Set on the norms of a bf16 residual stream (`model.residual = "compute"`): the weight
        # meets the input in its dtype, as under FSDP's bf16 parameters (one fused kernel; an
        # fp32 weight would send rms_norm to its unfused path).
        self.weight_to_input = False

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if self.weight_to_input and w.dtype != x.dtype:
            w = w.to(x.dtype)
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)
