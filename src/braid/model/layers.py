"""Small building blocks: RMSNorm and the SwiGLU feed-forward (rotary embeddings: rope.py).

Shape legend: B batch, T time (tokens), D model dim, H heads, K kv heads, Dh head dim, F ffn dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from braid.model.rope import apply_rope, plain_rope_table
from braid.ops.swiglu import swiglu

# Kept importable from here: rope_table(rot, max_len, theta) is the unscaled table.
rope_table = plain_rope_table
__all__ = ["RMSNorm", "SwiGLU", "apply_rope", "rope_table"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class SwiGLU(nn.Module):
    """y = W2 (silu(W1 x) * W3 x); W1 and W3 are stored fused as one [2F, D] matrix."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(swiglu(self.w13(x)))
