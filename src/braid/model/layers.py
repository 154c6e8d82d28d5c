"""Small building blocks: RMSNorm, the SwiGLU feed-forward, and rotary position embeddings.

Shape legend: B batch, T time (tokens), D model dim, H heads, K kv heads, Dh head dim, F ffn dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from braid.ops.swiglu import swiglu


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


def rope_table(head_dim: int, max_len: int, theta: float) -> Tensor:
    """cos/sin table of shape [max_len, head_dim/2, 2] (fp32)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    ang = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
    return torch.stack([ang.cos(), ang.sin()], dim=-1)


def apply_rope(x_BTHDh: Tensor, table_TDh2: Tensor) -> Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by the position angle; table rows match x's positions."""
    x = x_BTHDh.float().unflatten(-1, (-1, 2))
    cos, sin = table_TDh2[None, :, None, :, 0], table_TDh2[None, :, None, :, 1]
    out = torch.stack([x[..., 0] * cos - x[..., 1] * sin, x[..., 0] * sin + x[..., 1] * cos], -1)
    return out.flatten(-2).type_as(x_BTHDh)
