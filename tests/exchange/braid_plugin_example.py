"""An example plug-in exchange and compressor, used by name as
`exchange.algorithm = "braid_plugin_example:P2PExchange"` and
`exchange.compressor = "braid_plugin_example:Fp16Compressor"` (see docs/exchange.md).

`P2PExchange` moves rows with point-to-point sends and receives (`dist.batch_isend_irecv`)
instead of one all-to-all: one message per (source, destination) pair with rows to move. Its
handle is `WorksHandle` over those Works (wait, done, elapsed_ms: the whole `Handle` contract),
which is all the overlap engine needs to fill its windows and time it.
`Fp16Compressor` sends rows as float16 bytes (bound 2^-11 relative; values beyond fp16's
range of 65504 overflow, so it suits normalised activations only).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from braid.exchange.base import Done, Handle
from braid.exchange.compress import Compressor
from braid.exchange.config import ExchangeConfig
from braid.exchange.handles import WorksHandle
from braid.exchange.nccl import NcclExchange


class P2PExchange(NcclExchange):
    """Counts and all-reduces as `nccl`; rows by isend/irecv, one message per non-empty pair."""

    def __init__(self, ep_group, world_group, cfg: ExchangeConfig | None = None):
        super().__init__(ep_group, world_group, cfg)
        self.peers = dist.get_process_group_ranks(ep_group)  # group rank -> global rank
        self.calls = 0

    def move(self, x_RD: Tensor, send_splits: list[int], recv_splits: list[int]) -> Handle:
        self.calls += 1
        if self.size == 1:
            return Done(x_RD)
        x_RD = x_RD.contiguous()
        out = x_RD.new_empty((sum(recv_splits),) + tuple(x_RD.shape[1:]))
        ops, s0, r0 = [], 0, 0
        for w, (ns, nr) in enumerate(zip(send_splits, recv_splits, strict=True)):
            if w == self.rank:
                out[r0 : r0 + nr].copy_(x_RD[s0 : s0 + ns])
            else:
                if ns:
                    ops.append(
                        dist.P2POp(dist.isend, x_RD[s0 : s0 + ns], self.peers[w], self.ep_group)
                    )
                if nr:
                    ops.append(
                        dist.P2POp(dist.irecv, out[r0 : r0 + nr], self.peers[w], self.ep_group)
                    )
            s0, r0 = s0 + ns, r0 + nr
        return WorksHandle(dist.batch_isend_irecv(ops) if ops else [], out)


class Fp16Compressor(Compressor):
    name = "fp16-example"

    def encode(self, x_RD: Tensor) -> Tensor:
        return x_RD.to(torch.float16).view(torch.uint8)  # gloo has no fp16 all-to-all

    def decode(self, p_RB: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
        return p_RB.contiguous().view(torch.float16).to(dtype)

    def quant_bound(self, x_RD: Tensor) -> Tensor:
        return x_RD.float().abs() * 2.0**-11
