"""`nccl`: the exchange as one `all_to_all_single` with uneven splits (runs on NCCL and gloo).

Counts travel in a small all_to_all of int64s (blocking: the dispatcher needs them on the host
next); rows in one all_to_all_single whose `Work` the handle wraps (`WorksHandle`; async: on
CUDA, `wait()` makes the current stream wait for the communication stream). Router statistics
are summed over the world group, not the EP group: every rank holds a distinct slice of the
global batch.

Groups are passed in (`NcclExchange(ep_group, world_group, cfg)`); nothing here reads global
process-group state. `group_options` gives the options the groups are made with
(`exchange.high_priority`: NCCL's internal stream at high priority).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from braid.exchange.base import Done, Exchange, Handle
from braid.exchange.config import ExchangeConfig
from braid.exchange.handles import WorksHandle


def group_options(cfg: ExchangeConfig | None, backend: str) -> object | None:
    """Process-group options for the groups an exchange moves rows on: with
    `exchange.high_priority` on NCCL, a high-priority internal stream (None otherwise)."""
    if cfg is None or not cfg.high_priority or backend != "nccl":
        return None
    return dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)


class NcclExchange(Exchange):
    def __init__(
        self,
        ep_group: dist.ProcessGroup,
        world_group: dist.ProcessGroup,
        cfg: ExchangeConfig | None = None,
    ):
        self.ep_group, self.world_group, self.cfg = ep_group, world_group, cfg
        self.size = dist.get_world_size(ep_group)
        self.rank = dist.get_rank(ep_group)

    def exchange_counts(self, send_counts_WL: Tensor) -> Tensor:
        if self.size == 1:
            return send_counts_WL
        send = send_counts_WL.contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.ep_group)  # row w goes to rank w
        return recv

    def move(self, x_RD: Tensor, send_splits: list[int], recv_splits: list[int]) -> Handle:
        if self.size == 1:
            return Done(x_RD)
        out = x_RD.new_empty((sum(recv_splits),) + tuple(x_RD.shape[1:]))
        return self._all_to_all(x_RD, send_splits, recv_splits, out)

    def move_into(
        self, x_RD: Tensor, send_splits: list[int], recv_splits: list[int], out: Tensor
    ) -> Handle:
        if self.size == 1 or type(self).move is not NcclExchange.move:
            # One rank; or a subclass moving its own way (the P2P plug-in example): its `move`,
            # copied into `out` (Exchange's default), never an all-to-all behind its back.
            return super().move_into(x_RD, send_splits, recv_splits, out)
        return self._all_to_all(x_RD, send_splits, recv_splits, out)

    def _all_to_all(
        self, x_RD: Tensor, send_splits: list[int], recv_splits: list[int], out: Tensor
    ) -> Handle:
        work = dist.all_to_all_single(
            out,
            x_RD.contiguous(),
            output_split_sizes=recv_splits,
            input_split_sizes=send_splits,
            group=self.ep_group,
            async_op=True,
        )
        return WorksHandle([work], out)

    def enable_timing(self) -> None:
        if self.size > 1 and dist.get_backend(self.ep_group) == "nccl":
            self.ep_group._enable_collectives_timing()  # private torch API: Work._get_duration

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        out = t.detach().clone()  # statistics only: no autograd through the sum
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.world_group)
        return out
