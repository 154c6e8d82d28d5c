"""On CUDA the chunked pipeline uses the plain path's fused permutation kernels (gather + cast,
one-pass combine and its backward) and still equals the plain path. Needs a GPU:

    PYTHONPATH=src python -m pytest -q -m gpu tests/overlap/test_pipeline_cuda.py
"""

from __future__ import annotations

import copy

import pytest
import torch

from braid.model.config import ModelConfig
from braid.moe.config import MoEConfig
from braid.moe.layer import MoE
from braid.ops import permute
from braid.overlap.engine import LayerOverlap
from braid.overlap.streams import Clock

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _run(moe: MoE, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, _ = moe(x)
    y.float().square().sum().backward()
    if moe.overlap is not None:
        moe.overlap.flush()
    return [y.detach().float(), x.grad] + [p.grad for p in moe.parameters()]


@pytest.mark.parametrize(
    "chunks,split,by,dw",
    [
        (1, True, "auto", "auto"),
        (2, False, "auto", "auto"),
        (3, True, "auto", "auto"),
        (4, True, "tokens", "joined"),  # one dW over every chunk's rows, gathered on the GPU
        (4, True, "tokens", "per_chunk"),
    ],
)
def test_chunked_path_on_cuda_equals_plain_and_uses_fused_kernels(
    chunks, split, by, dw, monkeypatch
):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, top_k=2, expert_hidden=256, num_shared_experts=1)
    base = MoE(ModelConfig(dim=128), cfg).cuda()
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.05)
    x = torch.randn(1000, 128, device="cuda")
    want = _run(copy.deepcopy(base), x)
    calls = []
    for name in ("combine_fused", "combine_fused_grad"):
        real = getattr(permute, name)
        spy = lambda *a, real=real, name=name: (calls.append(name), real(*a))[1]  # noqa: E731
        monkeypatch.setattr(permute, name, spy)
    real_gather = permute._gather_cast_compiled
    monkeypatch.setattr(
        permute, "_gather_cast_compiled", lambda: (calls.append("gather_cast"), real_gather())[1]
    )
    moe = copy.deepcopy(base)
    clock = Clock(torch.device("cuda"))
    moe.overlap = LayerOverlap(0, chunks, split, clock, chunk_by=by, chunk_dw=dw)
    got = _run(moe, x)
    assert {"combine_fused", "combine_fused_grad", "gather_cast"} <= set(calls)
    if dw != "auto":
        assert moe.overlap.joined.decided() == dw
    for g, w in zip(got, want, strict=True):
        err = float((g - w).abs().max() / w.abs().max())
        assert err < 2e-2, err  # bf16 GEMMs over differently grouped rows


@pytest.mark.parametrize("chunks,split", [(2, False), (4, True)])
def test_chunks_of_experts_receive_in_place_on_the_exchange_stream(chunks, split):
    """The simulated exchange writes every chunk's combine (and dispatch-grad) into one buffer
    on its own stream, behind the movements queued before it (a slow link: each spins for
    milliseconds), so a read of the buffer not ordered after those writes would see unwritten
    rows. The pipeline equals the plain path with the same exchange, twice (bitwise)."""
    from braid.exchange.config import ExchangeConfig
    from braid.exchange.simulated import SimulatedExchange

    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, top_k=2, expert_hidden=256)
    base = MoE(ModelConfig(dim=128), cfg).cuda()
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.05)
    # 2 simulated ranks: 4 experts a rank, so up to 4 chunks of experts (chunk_local).
    slow = ExchangeConfig(
        algorithm="simulated", simulate_gbps=0.2, simulate_latency_us=1.0, simulate_ranks=2
    )
    x = torch.randn(1000, 128, device="cuda")
    ref = copy.deepcopy(base)
    ref.dispatcher.exchange = SimulatedExchange(cfg=slow)
    want = _run(ref, x)
    runs = []
    for _ in range(2):
        moe = copy.deepcopy(base)
        moe.dispatcher.exchange = SimulatedExchange(cfg=slow)
        clock = Clock(torch.device("cuda"))
        moe.overlap = LayerOverlap(0, chunks, split, clock, chunk_by="experts")
        runs.append(_run(moe, x))
    for g, w, again in zip(runs[0], want, runs[1], strict=True):
        assert torch.equal(g, again)
        err = float((g - w).abs().max() / w.abs().max())
        assert err < 2e-2, err  # bf16 GEMMs over differently grouped rows
