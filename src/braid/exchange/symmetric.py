"""`symmetric` (RDEP, as in NMoE): ranks write rows straight into their owner's receive buffer.

Every rank of the expert-parallel group holds a receive buffer in CUDA symmetric memory
(`torch.distributed._symmetric_memory`), mapped into every peer's address space. A movement is
copies and device-side signals, with no NCCL collective on the rows:
  1. counts: each rank writes its send splits into row `rank` of every peer's small symmetric
     [W, W] counts table, then a device barrier (channel 0); one host read of the table gives
     every rank the full matrix M[src][dst] (host sync: offsets and sizes are host integers);
  2. sizes: from M every rank computes the same per-destination offsets and the same largest
     receive size, so buffer growth or the overflow error happens on all ranks at once;
  3. rows: rank r copies its block for d into d's buffer at byte offset sum_{w<r} M[w][d] * B
     (peers in the order r+1, r+2, ... to spread the links; its own block goes straight into
     the output), then a barrier (channel 1): once it returns, every block addressed to this
     rank has landed;
  4. the owner copies the peers' rows out of the buffer (the next movement reuses the buffer,
     and autograd keeps the rows) into the output, in source-rank order as the contract says.
Steps 1-4 run on the exchange's own stream; steps 3-4 are ordered after the caller's stream
(step 1 needs only host data, so its host sync waits for earlier exchange work, not for the
caller's queued compute); `wait()` orders the caller's stream after step 4, so work issued
between `move` and `wait` overlaps the copies.
Every payload is moved as raw bytes (B bytes per row), so packed compressed rows fit too.
Several movements in flight (the overlap pipeline's chunks, and every MoE layer of a model
shares one exchange) reuse the one buffer and counts table safely: they run in issue order on
the exchange's stream, so a peer reaches movement k+1's counts barrier only after its step 4 of
movement k, and no rank writes k+1's rows into a peer's buffer before the peer copied k's out;
likewise every peer read k's counts before k's row barrier, which precedes k+1's counts writes.

Buffer size: `exchange.symmetric_capacity` rows of the widest payload seen (a bf16 row of dim
D is 2D bytes). With 0 the buffer is sized at the first movement to `symmetric_headroom` x the
largest receive and regrown the same way when a step needs more (all ranks decide from the
same M, so the collective re-rendezvous never deadlocks); a fixed capacity that a step exceeds
raises a BraidError naming the size to set. Multicast (multimem) is never used.
Only for GPUs of one NVLink domain (the CUDA symmetric-memory backend maps peers' memory).
"""

from __future__ import annotations

import importlib.util
import logging
import math

import torch
from torch import Tensor

from braid.errors import BraidError
from braid.exchange.base import Done, Handle
from braid.exchange.config import ExchangeConfig
from braid.exchange.handles import EventHandle
from braid.exchange.nccl import NcclExchange
from braid.overlap.streams import new_stream

log = logging.getLogger(__name__)

NEEDS_CUDA = (
    "exchange.algorithm=symmetric needs CUDA GPUs with symmetric memory; use nccl or hierarchical"
)


def symmetric_available() -> bool:
    """True when this process can build a `symmetric` exchange (CUDA and symmetric memory)."""
    if not torch.cuda.is_available():
        return False
    return importlib.util.find_spec("torch.distributed._symmetric_memory") is not None


class SymmetricExchange(NcclExchange):
    def __init__(self, ep_group, world_group, cfg: ExchangeConfig | None = None):
        if not symmetric_available():
            raise BraidError(NEEDS_CUDA)
        super().__init__(ep_group, world_group, cfg)
        self.cfg = cfg if cfg is not None else ExchangeConfig()
        # Ranks per node: `exchange.node_size` as `braid.parallel` resolved it from its context
        # (built directly with 0: the visible GPUs). Nothing here reads the environment.
        local = self.cfg.node_size or torch.cuda.device_count()
        if self.size > local:
            raise BraidError(
                f"exchange.algorithm=symmetric needs the expert-parallel group on one node "
                f"(parallel.ep={self.size} > {local} local GPUs); use hierarchical"
            )
        import torch.distributed._symmetric_memory as symm_mem

        self.symm_mem = symm_mem
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.group_name = ep_group.group_name
        # The exchange's own stream, as NCCL has its internal one (braid.overlap.streams).
        self.stream = new_stream(self.device, self.cfg.high_priority)
        W = self.size
        self.counts = symm_mem.empty(W * W, dtype=torch.long, device=self.device).zero_()
        self.counts_hdl = symm_mem.rendezvous(self.counts, self.group_name)
        # Peers' tables and buffers as local tensors, mapped once (get_buffer per call costs).
        self.peer_counts = [self.counts_hdl.get_buffer(p, (W, W), torch.long) for p in range(W)]
        self.peer_bufs: list[Tensor] = []
        self.rows = self.cfg.symmetric_capacity  # capacity in rows of `row_bytes` bytes
        self.row_bytes = 0
        self.buf: Tensor | None = None
        self.buf_hdl = None

    def move(self, x_RD: Tensor, send_splits: list[int], recv_splits: list[int]) -> Handle:
        if self.size == 1:
            return Done(x_RD)
        W, me = self.size, self.rank
        x_RD = x_RD.contiguous()
        tail = tuple(x_RD.shape[1:])
        B = _row_bytes(x_RD)
        out = x_RD.new_empty((sum(recv_splits),) + tail)
        cur = torch.cuda.current_stream(self.device)
        start = torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            start.record(self.stream)
            # 1. counts: row `me` of every peer's table, barrier, one host read. The counts are
            #    host data, so this waits only for earlier exchange work, not the caller's.
            send_W = torch.tensor(send_splits, dtype=torch.long, device=self.device)
            for p in _peer_order(me, W):
                self.peer_counts[p][me].copy_(send_W)
            self.counts_hdl.barrier(channel=0)
            M = self.counts.view(W, W).tolist()  # host sync
            # 2. sizes, the same on every rank.
            need = max(sum(M[w][d] for w in range(W)) for d in range(W))
            self._ensure(need, B)
            # 3. rows into the owners' buffers (own rows straight into the output), then the
            #    barrier after which every block addressed to this rank has landed.
            self.stream.wait_stream(cur)
            x_RD.record_stream(self.stream)
            out.record_stream(self.stream)
            xb = x_RD.view(torch.uint8).view(-1, B)
            ob = out.view(torch.uint8).view(-1, B)
            start = [0] + list(_cumsum(send_splits))
            mine = sum(M[w][me] for w in range(me))  # first row of my own block in `out`
            for d in _peer_order(me, W):
                n = M[me][d]
                rows = xb[start[d] : start[d] + n]
                if n and d == me:
                    ob[mine : mine + n].copy_(rows)
                elif n:
                    off = sum(M[w][d] for w in range(me)) * B
                    self.peer_bufs[d][off : off + n * B].view(n, B).copy_(rows)
            self.buf_hdl.barrier(channel=1)
            # 4. the peers' rows out of the buffer (it is reused by the next movement).
            total, own = sum(M[w][me] for w in range(W)), M[me][me]
            for lo, hi in ((0, mine), (mine + own, total)):
                if hi > lo:
                    ob[lo:hi].copy_(self.buf[lo * B : hi * B].view(-1, B))
            done = torch.cuda.Event(enable_timing=True)
            done.record(self.stream)
        return EventHandle(start, done, out)

    def _ensure(self, need_rows: int, row_bytes: int) -> None:
        """Grow or check the receive buffer; every rank calls this with the same arguments."""
        rows, width = self.rows, max(self.row_bytes, row_bytes)
        if self.cfg.symmetric_capacity:
            if need_rows > rows:
                raise BraidError(
                    f"exchange.symmetric_capacity={rows} rows is too small: this step sends "
                    f"{need_rows} rows to one rank; set exchange.symmetric_capacity>={need_rows} "
                    "(worst case tokens_per_rank*top_k*ep) or 0 to grow on demand"
                )
        elif need_rows > rows:
            rows = math.ceil(need_rows * self.cfg.symmetric_headroom)
        if self.buf is not None and rows == self.rows and width == self.row_bytes:
            return
        self.rows, self.row_bytes = max(rows, 1), max(width, 1)
        nbytes = self.rows * self.row_bytes
        log.info(
            "symmetric exchange: receive buffer %d rows x %d bytes (%.1f MiB) per rank",
            self.rows,
            self.row_bytes,
            nbytes / 2**20,
        )
        self.buf, self.buf_hdl, self.peer_bufs = None, None, []  # free the old one first
        self.buf = self.symm_mem.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.buf_hdl = self.symm_mem.rendezvous(self.buf, self.group_name)
        self.peer_bufs = [
            self.buf_hdl.get_buffer(p, (nbytes,), torch.uint8) for p in range(self.size)
        ]


def _row_bytes(x_RD: Tensor) -> int:
    return math.prod(x_RD.shape[1:]) * x_RD.element_size()


def _peer_order(me: int, W: int) -> list[int]:
    return [(me + s) % W for s in range(1, W)] + [me]


def _cumsum(xs: list[int]):
    total = 0
    for x in xs:
        total += x
        yield total
