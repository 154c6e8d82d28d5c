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
from braid.overlap.pipeline import LayerOverlap
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


@pytest.mark.parametrize("chunks,split", [(1, True), (2, False), (3, True)])
def test_chunked_path_on_cuda_equals_plain_and_uses_fused_kernels(chunks, split, monkeypatch):
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
    moe.overlap = LayerOverlap(0, chunks, split, Clock(torch.device("cuda")))
    got = _run(moe, x)
    assert {"combine_fused", "combine_fused_grad", "gather_cast"} <= set(calls)
    for g, w in zip(got, want, strict=True):
        err = float((g - w).abs().max() / w.abs().max())
        assert err < 2e-2, err  # bf16 GEMMs over differently grouped rows
