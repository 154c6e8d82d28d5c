"""`bf16`: fp32 rows travel as bfloat16; rows of 2 bytes or less per element pass unchanged.

Bound: round-to-nearest to 8 significant bits, |x_hat - x| <= 2^-8 |x| per element (no scale,
no underflow concern at activation magnitudes: bf16 has fp32's exponent range).
"""

from __future__ import annotations

import torch
from torch import Tensor

from braid.exchange.compress.base import Compressor


class Bf16Compressor(Compressor):
    name = "bf16"

    def encode(self, x_RD: Tensor) -> Tensor:
        if x_RD.element_size() <= 2:
            return x_RD
        return x_RD.to(torch.bfloat16)

    def decode(self, p_RB: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
        return p_RB.to(dtype)

    def quant_bound(self, x_RD: Tensor) -> Tensor:
        if x_RD.element_size() <= 2:
            return torch.zeros_like(x_RD, dtype=torch.float32)
        return x_RD.float().abs() * 2.0**-8
