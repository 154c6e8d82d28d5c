"""How compressors attach to exchanges: a wrapper that compresses the forward payloads.

`CompressedExchange(inner, compressor, compress_combine)` is itself an Exchange:
- `dispatch`: encode the rows, move the packed rows with `inner.dispatch`, decode on `wait()`;
- `combine`: the same when `compress_combine`, else `inner.combine` unchanged;
- `move` (the exact path gradients take), `move_into`, `exchange_counts`, `all_reduce_sum`:
  `inner`'s (and `combine_into` when the combine is not compressed).
Packed rows keep one row per payload row, so the splits do not change and any exchange (a
user's plug-in too) can move them; compression is orthogonal to transport.
`with_compressor(inner, cfg)` applies `cfg.compressor` (`none` returns `inner` itself).
"""

from __future__ import annotations

import torch
from torch import Tensor

from braid.exchange.base import Exchange, Handle, receive_into
from braid.exchange.compress.base import Compressor
from braid.exchange.config import ExchangeConfig


class DecodeHandle(Handle):
    """Waits for the packed rows, then decodes them to [R, dim] rows of `dtype`."""

    def __init__(self, inner: Handle, compressor: Compressor, dim: int, dtype: torch.dtype):
        self.inner, self.compressor, self.dim, self.dtype = inner, compressor, dim, dtype

    def done(self) -> bool:
        return self.inner.done()

    def elapsed_ms(self) -> float | None:
        return self.inner.elapsed_ms()

    def wait(self) -> Tensor:
        return self.compressor.decode(self.inner.wait(), self.dim, self.dtype)


class CompressedExchange(Exchange):
    def __init__(self, inner: Exchange, compressor: Compressor, compress_combine: bool = False):
        self.inner, self.compressor, self.compress_combine = inner, compressor, compress_combine
        self.size, self.rank = inner.size, inner.rank

    def exchange_counts(self, send_counts_WL: Tensor) -> Tensor:
        return self.inner.exchange_counts(send_counts_WL)

    def move(self, x_RD: Tensor, send_splits: list[int], recv_splits: list[int]) -> Handle:
        return self.inner.move(x_RD, send_splits, recv_splits)

    def dispatch(self, x_RD: Tensor, send_splits: list[int], recv_splits: list[int]) -> Handle:
        p_RB = self.compressor.encode(x_RD)
        h = self.inner.dispatch(p_RB, send_splits, recv_splits)
        return DecodeHandle(h, self.compressor, x_RD.shape[1], x_RD.dtype)

    def combine(self, y_RD: Tensor, send_splits: list[int], recv_splits: list[int]) -> Handle:
        if not self.compress_combine:
            return self.inner.combine(y_RD, send_splits, recv_splits)
        p_RB = self.compressor.encode(y_RD)
        h = self.inner.combine(p_RB, send_splits, recv_splits)
        return DecodeHandle(h, self.compressor, y_RD.shape[1], y_RD.dtype)

    def move_into(
        self, x_RD: Tensor, send_splits: list[int], recv_splits: list[int], out: Tensor
    ) -> Handle:
        return receive_into(self.inner, "move", x_RD, send_splits, recv_splits, out)

    def combine_into(
        self, y_RD: Tensor, send_splits: list[int], recv_splits: list[int], out: Tensor
    ) -> Handle:
        if not self.compress_combine:
            return receive_into(self.inner, "combine", y_RD, send_splits, recv_splits, out)
        return super().combine_into(y_RD, send_splits, recv_splits, out)

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        return self.inner.all_reduce_sum(t)

    def enable_timing(self) -> None:
        self.inner.enable_timing()

    @property
    def traffic_ranks(self) -> int:
        return self.inner.traffic_ranks


def with_compressor(
    inner: Exchange, cfg: ExchangeConfig, *, allow_import: bool = False
) -> Exchange:
    """`inner` wrapped with `cfg.compressor` (and `cfg.compress_combine`); `none` is `inner`.
    A dotted compressor must have been imported by validating the user's config, unless
    `allow_import` (the caller's own code names it)."""
    from braid.exchange.compress import get_compressor

    if cfg.compressor == "none":
        return inner
    cls = get_compressor(cfg.compressor, allow_import=allow_import)
    return CompressedExchange(inner, cls(cfg), cfg.compress_combine)
