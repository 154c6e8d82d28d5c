"""`fp8`: float8 e4m3 values with fp32 scales per row or per block of `exchange.scale_block`
elements (DeepSeek-V3 quantises dispatched activations in 1x128 tiles).

The arithmetic is `braid.ops.fp8` (power-of-two scales, max|x_blk| lands in (224, 448]; fused
on CUDA), the same quantiser the fp8 GEMMs use. With `train.precision=fp8` the dispatcher sends
rows in exactly this wire format and the expert GEMM consumes the received codes and scales
without decoding (`braid.moe.fp8_dispatch`): this compressor is that path with a `decode` at
the receiver, for bf16 training that only wants the exchange halved.
The fp8 bytes travel as uint8 (no backend has fp8 collectives on every device).
Wire format per row: D bytes, then ceil(D / block) fp32 scales (block 128: D + D/32 bytes).

Bound: e4m3 keeps 4 significant bits, so a normal value rounds with relative error <= 2^-4;
below 2^-6 (in scaled units) values are subnormal with spacing 2^-9, absolute error <= 2^-10.
Per element: |x_hat - x| <= 2^-4 |x| + 2^-10 s, s the scale of the element's block.
Rows whose width is not a multiple of the block are zero-padded for scaling.
"""

from __future__ import annotations

import torch
from torch import Tensor

from braid.exchange.compress.base import Compressor, new_packed, unpack_scales
from braid.ops import fp8


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
        q, s = fp8.quantize(self._blocks(x_RD.contiguous()))  # [R, N, B], [R, N, 1]
        p_RB, q_bytes = new_packed(R, D, 1, x_RD.device, s.flatten(1))
        q_bytes.copy_(q.view(torch.uint8).flatten(1)[:, :D])
        return p_RB

    def unpack(self, p_RB: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        """The e4m3 codes [R, dim] and scales [R, nblocks] of packed rows, not decoded."""
        return p_RB[:, :dim].view(fp8.E4M3), unpack_scales(p_RB, dim)

    def decode(self, p_RB: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
        q_RD, s_RN = self.unpack(p_RB, dim)
        (R, N), blk = s_RN.shape, self._block(dim)
        if N * blk != dim:  # padded last block: pad the codes (0 = fp8 0)
            q_RD = torch.nn.functional.pad(q_RD.view(torch.uint8), (0, N * blk - dim))
            q_RD = q_RD.view(fp8.E4M3)
        x = fp8.dequantize(q_RD.reshape(R, N, blk), s_RN.unsqueeze(2), dtype)
        return x.flatten(1)[:, :dim]

    def quant_bound(self, x_RD: Tensor) -> Tensor:
        R, D = x_RD.shape
        x_RNB = self._blocks(x_RD.float())
        _, s = fp8.quantize_ref(x_RNB)
        return fp8.bound(x_RNB, s).flatten(1)[:, :D]
