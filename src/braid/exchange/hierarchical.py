"""`hierarchical` (Pipe-A2A): a two-stage all-to-all that crosses between nodes once per row.

The W ranks of the expert-parallel group form N = W/S nodes of S ranks (`exchange.node_size`;
0 is resolved by `braid.parallel` to the ranks per node of its parallel context); rank r is
(node a, local index i) with r = a*S + i. Rows bound
for rank (b, j) travel:
  stage 1 (intra-node, group "node a"): (a, i) -> (a, j), the local rank whose index matches the
           destination's, so it gathers every row of node a bound for rank (b, j);
  stage 2 (inter-node, group "rail j" = {(n, j) for all n}): (a, j) -> (b, j), one message per
           node pair and rail carrying the rows of all S senders of node a.
Because the gatherer already has the destination's local index, the "scatter inside the
destination node" of the textbook three-stage scheme is empty: each row makes at most one
NVLink hop and one network hop, and all S rails (one NIC per GPU) carry traffic.

    node 0              node 1                  step c moves rows from node a to node a+c:
    (0,0) ---rail 0--- (1,0)                      c = 1..N-1: stage 1 on the node group,
      |  \\  stage 1      |                                   then stage 2 on the rail group
    (0,1) ---rail 1--- (1,1)                      c = 0:      stage 1 only (rows stay home)

Pipelining: stage 1 of every step is issued at once on the node group (its own communicator
and stream); as each one lands, its stage 2 is issued on the rail group, so NVLink (stage 1 of
step c+1) and the network (stage 2 of step c) are busy at the same time. Each remote step is
cut into `exchange.hierarchical_chunks` pieces (each (source, destination) block split evenly)
for a finer pipeline; chunk pieces land in a scratch buffer and are copied into place, while
unchunked steps (and the local step, issued last) are received directly in the output.
Rows of step c come from node a-c and fill that node's contiguous part of the output, which is
in source-rank order as the contract requires.

Phases of `move`: (1) counts: one small all-to-all in the node group, then a host sync (the
forwarding rank must know the sizes of the rows it forwards); (2) issue all stage-1 pieces;
(3) issue each stage 2 when its stage 1 completes (on CUDA this only orders streams; on gloo
it blocks); `wait()` (4) waits for the rest and copies chunk pieces into place.
Node sizes 1 and W degenerate to one all-to-all over the group, identical to `nccl`.
Sub-groups are created with `dist.new_group`, which every process must call for every group in
the same order: ranks all-gather their EP groups' memberships and create the groups of every EP
group in sorted order. EP ranks are assumed node-major (consecutive EP ranks share a node).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import Tensor

from braid.errors import BraidError
from braid.exchange.base import Done, Handle
from braid.exchange.config import ExchangeConfig
from braid.exchange.handles import WorksHandle
from braid.exchange.nccl import NcclExchange, group_options


def resolve_node_size(cfg: ExchangeConfig, ep_size: int) -> int:
    """`exchange.node_size`. `braid.parallel` resolves 0 to the ranks per node from its parallel
    context before it builds the exchange; an exchange built directly with 0 treats the EP group
    as one node (the two stages degenerate to one all-to-all). Nothing here reads the
    environment."""
    if cfg.node_size:
        if ep_size % cfg.node_size:
            raise BraidError(
                f"exchange.node_size={cfg.node_size} must divide the expert-parallel size "
                f"{ep_size}; set it to the GPUs per node or 0"
            )
        return cfg.node_size
    return ep_size


def _part(n: int, k: int, chunks: int) -> tuple[int, int]:
    """Rows [lo, hi) of piece k when a block of n rows is cut into `chunks` even pieces."""
    return n * k // chunks, n * (k + 1) // chunks


def _build_groups(ep_group, node_size: int, options: object | None = None):
    """(node group, rail group) of this rank; every process creates every EP group's groups
    (with `options`, `nccl.group_options`)."""
    mine = tuple(dist.get_process_group_ranks(ep_group))
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    me = dist.get_rank()
    node_g = rail_g = None
    for ranks in sorted(set(every)):
        N = len(ranks) // node_size
        for n in range(N):
            members = list(ranks[n * node_size : (n + 1) * node_size])
            g = dist.new_group(members, pg_options=options)
            node_g = g if me in members else node_g
        for j in range(node_size):
            members = [ranks[n * node_size + j] for n in range(N)]
            g = dist.new_group(members, pg_options=options)
            rail_g = g if me in members else rail_g
    return node_g, rail_g


class HierarchicalExchange(NcclExchange):
    def __init__(self, ep_group, world_group, cfg: ExchangeConfig | None = None):
        super().__init__(ep_group, world_group, cfg)
        cfg = cfg if cfg is not None else ExchangeConfig()
        self.node_size = resolve_node_size(cfg, self.size)
        self.num_nodes = self.size // self.node_size
        self.chunks = cfg.hierarchical_chunks
        self.node, self.local = divmod(self.rank, self.node_size)
        self.two_stage = 1 < self.node_size < self.size
        self.node_group = self.rail_group = None
        if self.two_stage:
            options = group_options(cfg, dist.get_backend(ep_group))
            self.node_group, self.rail_group = _build_groups(ep_group, self.node_size, options)

    def move(self, x_RD: Tensor, send_splits: list[int], recv_splits: list[int]) -> Handle:
        if self.size == 1:
            return Done(x_RD)
        if not self.two_stage:
            return super().move(x_RD, send_splits, recv_splits)
        two = _TwoStage(self, x_RD.contiguous(), send_splits, recv_splits)
        return WorksHandle(two.works, two.out, finish=two.place, started=two.started)


class _TwoStage:
    """One hierarchical movement: phases (1)-(3) run in __init__, (4) in `place` (at wait)."""

    def __init__(self, ex: HierarchicalExchange, x_RD: Tensor, send: list[int], recv: list[int]):
        S, N, K, a = ex.node_size, ex.num_nodes, ex.chunks, ex.node
        tail = tuple(x_RD.shape[1:])
        send_off = [0] + list(_cumsum(send))
        recv_off = [0] + list(_cumsum(recv))
        self.out = out = x_RD.new_empty((recv_off[-1],) + tail)
        self.copies: list[tuple[Tensor, list[tuple[int, int]]]] = []
        self.works: list = []
        self.keep: list[Tensor] = []
        self.started = time.perf_counter()

        # (1) counts: c1[i][b] = rows that (a, i) sends to (b, j), j = this rank's local index.
        send_NS = torch.tensor(send, dtype=torch.long, device=x_RD.device).view(N, S)
        c1_SN = torch.empty(S, N, dtype=torch.long, device=x_RD.device)
        dist.all_to_all_single(c1_SN, send_NS.t().contiguous(), group=ex.node_group)
        c1 = c1_SN.tolist()  # host sync: stage-1 receive sizes and stage-2 send sizes

        # (2) stage 1 of every remote step (piece by piece), then the local step.
        stage1 = []
        for c in range(1, N):
            b = (a + c) % N
            for k in range(K):
                sizes = [_part(send[b * S + j], k, K) for j in range(S)]
                if K == 1:
                    src = x_RD[send_off[b * S] : send_off[b * S + S]]
                else:
                    src = torch.cat(
                        [
                            x_RD[send_off[b * S + j] + lo : send_off[b * S + j] + hi]
                            for j, (lo, hi) in enumerate(sizes)
                        ]
                    )
                rsz = [_sz(_part(c1[i][b], k, K)) for i in range(S)]
                buf = x_RD.new_empty((sum(rsz),) + tail)
                w = dist.all_to_all_single(
                    buf, src, rsz, [_sz(p) for p in sizes], group=ex.node_group, async_op=True
                )
                self.keep.append(src)
                stage1.append((c, k, buf, w))
        local = out[recv_off[a * S] : recv_off[a * S + S]]
        src = x_RD[send_off[a * S] : send_off[a * S + S]]
        self.works.append(
            dist.all_to_all_single(
                local,
                src,
                recv[a * S : a * S + S],
                send[a * S : a * S + S],
                group=ex.node_group,
                async_op=True,
            )
        )

        # (3) stage 2 of each remote step as soon as its stage 1 is in.
        for c, k, buf, w in stage1:
            w.wait()
            b, src_node = (a + c) % N, (a - c) % N
            ssplit = [0] * N
            ssplit[b] = buf.shape[0]
            parts = [_part(recv[src_node * S + i], k, K) for i in range(S)]
            rsplit = [0] * N
            rsplit[src_node] = sum(_sz(p) for p in parts)
            if K == 1:
                dst = out[recv_off[src_node * S] : recv_off[src_node * S + S]]
            else:
                dst = x_RD.new_empty((rsplit[src_node],) + tail)
                places = [
                    (recv_off[src_node * S + i] + lo, hi - lo) for i, (lo, hi) in enumerate(parts)
                ]
                self.copies.append((dst, places))
            self.keep.append(buf)
            self.works.append(
                dist.all_to_all_single(dst, buf, rsplit, ssplit, group=ex.rail_group, async_op=True)
            )

    def place(self, out: Tensor) -> Tensor:
        """(4), after every Work completed: chunk pieces into their source blocks."""
        for tmp, places in self.copies:
            at = 0
            for start, n in places:
                out[start : start + n].copy_(tmp[at : at + n])
                at += n
        self.copies, self.keep = [], []
        return out


def _sz(part: tuple[int, int]) -> int:
    return part[1] - part[0]


def _cumsum(xs: list[int]):
    total = 0
    for x in xs:
        total += x
        yield total
