"""The compressor contract: rows in, packed rows out, and back, within a stated error bound.

A compressor is rank-independent arithmetic on a [R, D] payload (R rows of width D):
- `encode(x_RD)` returns R packed rows `p_RB` whose dtype every backend can move (fp32, bf16 or
  uint8: gloo has no fp8 or int8 collectives, so quantised values and their fp32 scales travel
  as bytes in ONE uint8 row buffer, payload bytes first, then scale bytes). Row r of the result
  depends only on row r of the input, so any exchange can move packed rows with the same splits.
- `decode(p_RB, dim, dtype)` returns the [R, dim] rows in `dtype`.
- the bound: for every element, |decode(encode(x)) - x| <= `bound(x_RD)`: the compressor's own
  error `quant_bound` (stated in its docstring, fp32 arithmetic included) plus, for payloads
  narrower than fp32, the rounding of the decoded value to the payload dtype, at most
  u(|x| + quant_bound) (unit roundoff u = 2^-8 for bf16). Unit tests check it on hard rows.
Gradients never see a compressor: the dispatcher's backward is the exact reverse `move`, so
compression is straight-through (d decode(encode(x)) / dx := identity).

Shape legend: R rows, D row width, B packed bytes per row, S scales per row.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from braid.exchange.config import ExchangeConfig


class Compressor(ABC):
    """Base class of payload compressors; `cls(cfg)` builds one from the `[exchange]` section."""

    name: str = "?"

    def __init__(self, cfg: ExchangeConfig | None = None):
        self.cfg = cfg if cfg is not None else ExchangeConfig()

    @abstractmethod
    def encode(self, x_RD: Tensor) -> Tensor: ...

    @abstractmethod
    def decode(self, p_RB: Tensor, dim: int, dtype: torch.dtype) -> Tensor: ...

    @abstractmethod
    def quant_bound(self, x_RD: Tensor) -> Tensor:
        """Elementwise worst-case |decode(encode(x)) - x| before rounding to the payload dtype."""

    def bound(self, x_RD: Tensor) -> Tensor:
        """Elementwise worst-case |decode(encode(x)) - x| for rows of x's dtype."""
        q = self.quant_bound(x_RD)
        if x_RD.dtype == torch.float32:
            return q
        u = torch.finfo(x_RD.dtype).eps / 2
        return q + u * (x_RD.float().abs() + q)

    def wire_bytes(self, dim: int, dtype: torch.dtype) -> int:
        """Bytes one row of width `dim` occupies on the wire."""
        p = self.encode(torch.zeros(1, dim, dtype=dtype))
        return p.shape[1] * p.element_size()

    def roundtrip(self, x_RD: Tensor) -> Tensor:
        return self.decode(self.encode(x_RD), x_RD.shape[1], x_RD.dtype)


class NoCompressor(Compressor):
    """`none`: rows travel as they are (exact)."""

    name = "none"

    def encode(self, x_RD: Tensor) -> Tensor:
        return x_RD

    def decode(self, p_RB: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
        return p_RB

    def quant_bound(self, x_RD: Tensor) -> Tensor:
        return torch.zeros_like(x_RD, dtype=torch.float32)


def new_packed(
    R: int, D: int, itemsize: int, device: torch.device, scales_RS: Tensor
) -> tuple[Tensor, Tensor]:
    """One uint8 row buffer [R, D*itemsize + 4*S] with the fp32 scales already in its tail, and
    the (strided) byte view of its first D*itemsize bytes per row, for the values."""
    qb = D * itemsize
    s_bytes = scales_RS.to(torch.float32).contiguous().view(torch.uint8)  # [R, 4 * S]
    p_RB = torch.empty(R, qb + s_bytes.shape[1], dtype=torch.uint8, device=device)
    p_RB[:, qb:].copy_(s_bytes)
    return p_RB, p_RB[:, :qb]


def unpack_scales(p_RB: Tensor, qbytes: int) -> Tensor:
    """The fp32 scales [R, S] stored after the first `qbytes` bytes of each packed row."""
    return p_RB[:, qbytes:].contiguous().view(torch.float32)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, compressor):
        return compressor.roundtrip(x)

    @staticmethod
    def backward(ctx, g):
        return g, None


def straight_through(x_RD: Tensor, compressor: Compressor) -> Tensor:
    """decode(encode(x)) in the forward pass, identity in the backward pass: what a compressing
    exchange does to the rows, without moving them (single-process simulation and references)."""
    return _StraightThrough.apply(x_RD, compressor)
