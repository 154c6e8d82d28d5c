"""One dispatch seam: the plain and the chunked path count, cap and route through the dispatcher.

The overlap pipeline is a scheduler over `TokenDispatcher`'s primitives; if it re-derived the
sort, the counts or the capacity rule, replacing the dispatcher's functions would leave the
chunked path unchanged. These tests replace them and require both paths to follow.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import braid.moe.dispatcher as dispatcher_mod
import braid.overlap.pipeline as pipeline_mod
from braid.moe.dispatcher import TokenDispatcher
from braid.moe.layer import MoE
from braid.overlap.engine import LayerOverlap
from braid.overlap.streams import Clock
from small_moe import seeded_moe

CPU = Clock(torch.device("cpu"))


def _forward(moe: MoE, x: torch.Tensor, chunks: int | None, by: str = "tokens"):
    moe = copy.deepcopy(moe)
    if chunks is not None:
        moe.overlap = LayerOverlap(0, chunks, True, CPU, chunk_by=by)
    x = x.clone().requires_grad_()
    y, stats = moe(x)
    y.square().sum().backward()
    return y.detach(), x.grad, stats.num_dropped


@pytest.mark.parametrize("by", ["tokens", "experts"])
@pytest.mark.parametrize("capacity", [0.0, 1.0])
def test_both_paths_count_through_count_per_expert(monkeypatch, capacity, by):
    calls: list[int] = []
    real = dispatcher_mod.count_per_expert

    def spy(expert_M, num_experts):
        calls.append(expert_M.numel())
        return real(expert_M, num_experts)

    monkeypatch.setattr(dispatcher_mod, "count_per_expert", spy)
    moe = seeded_moe(capacity_factor=capacity)
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(1))
    extra = 1 if capacity else 0  # the capacity rule counts the whole batch once more
    _forward(moe, x, None)
    assert len(calls) == 1 + extra
    calls.clear()
    _forward(moe, x, 3, by)
    # tokens: one count per chunk; experts: one for all chunks; all through the dispatcher
    assert len(calls) == (3 if by == "tokens" else 1) + extra


@pytest.mark.parametrize("by", ["tokens", "experts"])
def test_both_paths_follow_the_dispatchers_capacity_rule(monkeypatch, by):
    moe = seeded_moe(capacity_factor=1.0)
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(2))
    before = _forward(moe, x, None)
    monkeypatch.setattr(TokenDispatcher, "capacity", lambda self, n: 1)  # one copy per expert
    plain, chunked = _forward(moe, x, None), _forward(moe, x, 3, by)
    assert plain[2].item() == chunked[2].item() == 18 * 2 - 4  # 4 experts keep one copy each
    assert not torch.equal(plain[0], before[0])
    for a, b in zip(plain, chunked, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_pipeline_holds_no_routing_math():
    src = inspect.getsource(pipeline_mod)
    for op in ("sort(", "scatter_add", "regroup_index", "inverse_permutation", "index_select"):
        assert op not in src, op
