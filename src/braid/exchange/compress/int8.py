"""`int8`: symmetric per-row absmax quantisation, q = round(x / s), s = max|x_row| / 127.

Wire format per row: D int8 values then one fp32 scale (D + 4 bytes; bf16 rows shrink ~2x,
fp32 rows ~4x). Bound: rounding to the nearest step of size s gives
|x_hat - x| <= s / 2 = max|x_row| / 254 per element (absolute, relative to the row's absmax),
times (1 + 2^-15) for the fp32 arithmetic of x / s and q * s (each within 127 * 2^-24 steps).
The arithmetic lives in `kernels.py` (fused on CUDA).
"""

from __future__ import annotations

import torch
from torch import Tensor

from braid.exchange.compress import kernels as K
from braid.exchange.compress.base import Compressor, new_packed, unpack_scales


class Int8Compressor(Compressor):
    name = "int8"

    def encode(self, x_RD: Tensor) -> Tensor:
        R, D = x_RD.shape
        q_RD, s_R1 = K.fused(K.quantize_int8_rows, x_RD)(x_RD.contiguous())
        p_RB, q_bytes = new_packed(R, D, 1, x_RD.device, s_R1)
        q_bytes.copy_(q_RD.view(torch.uint8))
        return p_RB

    def decode(self, p_RB: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
        s_R1 = unpack_scales(p_RB, dim)
        return K.fused(K.dequantize_int8_rows, p_RB)(p_RB, dim, s_R1, dtype)

    def quant_bound(self, x_RD: Tensor) -> Tensor:
        return (K.scales(x_RD, K.INT8_MAX) * (0.5 + 2.0**-16)).expand(x_RD.shape)
