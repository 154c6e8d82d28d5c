"""`hierarchical` with more than two nodes, and with more ranks per node than nodes, on 6 gloo
ranks (one spawn): the 4-rank conformance test (`test_exchange_ranks.py`) can only build 2 nodes
of 2 ranks, where node a+c and node a-c are the same node and a rank's node and local index are
the same whichever of S and N divides it. Here node_size 2 (3 nodes: every remote step c has a
distinct destination and source node) and node_size 3 (2 nodes of 3 ranks), unchunked and
chunked, must run as two stages and move the rows of random uneven splits exactly as `nccl`
does.
"""

from __future__ import annotations

import pytest
import torch
from exchange_conformance import _split_matrices

from harness import run_ranks

CONFIGS = {"n2c1": (2, 1), "n2c2": (2, 2), "n3c1": (3, 1), "n3c3": (3, 3)}


def _worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from braid.exchange import EXCHANGES, get_exchange
    from braid.exchange.config import ExchangeConfig

    torch.manual_seed(rank)
    G = dist.group.WORLD
    get_exchange("nccl")  # registers the built-ins
    nccl = EXCHANGES.get("nccl")(G, G, ExchangeConfig())
    hier = {
        name: EXCHANGES.get("hierarchical")(
            G, G, ExchangeConfig(node_size=s, hierarchical_chunks=k)
        )
        for name, (s, k) in CONFIGS.items()
    }
    mismatch = []
    for m, M in enumerate(_split_matrices(world)):
        send, recv = M[rank], [M[w][rank] for w in range(world)]
        x = torch.randn(sum(send), 3) * 100
        want = nccl.move(x, send, recv).wait()
        for name, ex in hier.items():
            got = ex.move(x, send, recv).wait()
            if not torch.equal(got, want):
                mismatch.append((name, m))
    return {"mismatch": mismatch, "two_stage": {n: ex.two_stage for n, ex in hier.items()}}


@pytest.fixture(scope="module")
def per_rank() -> list[dict]:
    return run_ranks(_worker, 6, timeout=120)  # a wrong node or step deadlocks the stages


def test_hierarchical_moves_with_three_nodes_or_three_ranks_per_node_match_nccl(per_rank):
    for r in per_rank:
        assert all(r["two_stage"].values()), r["two_stage"]  # node_size is taken, not ignored
        assert r["mismatch"] == []
