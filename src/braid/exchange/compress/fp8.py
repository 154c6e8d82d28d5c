"""`fp8`: float8 e4m3 values with fp32 scales per row or per block of `exchange.scale_block`
elements (DeepSeek-V3 quantises dispatched activations in 1x128 tiles).

Each block is scaled so that its absmax maps to 448, the largest e4m3 value: s = max|x_blk|/448,
q = e4m3(x / s). The fp8 bytes travel as uint8 (no backend has fp8 collectives on every device).
Wire format per row: D bytes, then ceil(D / block) fp32 scales (block 128: D + D/32 bytes).

Bound: e4m3 keeps 4 significant bits, so a normal value rounds with relative error <= 2^-4;
below 2^-6 (in scaled units) values are subnormal with spacing 2^-9, absolute error <= 2^-10.
Per element: |x_hat - x| <= 2^-4 |x| + 2^-10 s, s the scale of the element's block.
Rows whose width is not a multiple of the block are zero-padded for scaling. The arithmetic
lives in `kernels.py` (fused on CUDA).
"""

from __future__ import annotations

import torch
from torch import Tensor

from braid.exchange.compress import kernels as K
from braid.exchange.compress.base import Compressor, new_packed, unpack_scales


class Fp8Compressor(Compressor):
    name = "fp8"

    def _block(self, dim: int) -> int:
        return self.cfg.scale_block if 0 < self.cfg.scale_block < dim else dim

    def _blocks(self, x_RD: Tensor) -> Tensor:
        """x as [R, nblocks, block] (a view, or a zero-padded copy when block does not divide D)."""
        R, D = x_RD.shape
        blk = self._block(D)
        pad = -D % blk
        if pad:
            x_RD = torch.nn.functional.pad(x_RD, (0, pad))
        return x_RD.reshape(R, (D + pad) // blk, blk)

    def encode(self, x_RD: Tensor) -> Tensor:
        R, D = x_RD.shape
        x_RD = x_RD.contiguous()
        if self._block(D) == D:
            q, s = K.fused(K.quantize_fp8_rows, x_RD)(x_RD)
        else:
            x_RNB = self._blocks(x_RD)
            q, s = K.fused(K.quantize_fp8_blocks, x_RNB)(x_RNB)
        p_RB, q_bytes = new_packed(R, D, 1, x_RD.device, s.flatten(1))
        q_bytes.copy_(q.view(torch.uint8).flatten(1)[:, :D])
        return p_RB

    def decode(self, p_RB: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
        s_RN = unpack_scales(p_RB, dim)
        blk = self._block(dim)
        if blk == dim:
            return K.fused(K.dequantize_fp8_rows, p_RB)(p_RB, dim, s_RN, dtype)
        if s_RN.shape[1] * blk != dim:  # padded last block: pad the value bytes (0 = fp8 0)
            p_RB = torch.nn.functional.pad(p_RB[:, :dim], (0, s_RN.shape[1] * blk - dim))
            return K.dequantize_fp8_blocks(p_RB, p_RB.shape[1], s_RN.unsqueeze(2), dtype)[:, :dim]
        return K.fused(K.dequantize_fp8_blocks, p_RB)(p_RB, dim, s_RN.unsqueeze(2), dtype)

    def quant_bound(self, x_RD: Tensor) -> Tensor:
        R, D = x_RD.shape
        x_RNB = self._blocks(x_RD.float())
        err = x_RNB.abs() * 2.0**-4 + K.scales(x_RNB, K.FP8_MAX) * 2.0**-10
        return err.flatten(1)[:, :D]
