"""Gradient clipping measures the norm exactly enough that layouts agree, and scales correctly.

The distributed path (sum of local squares, copies counted once, one all-reduce) is exercised by
test_train_ep.py, whose grad norms must match one process; here, the single-process arithmetic.
"""

from __future__ import annotations

import torch
from torch import nn

from braid.parallel.clip import clip_grad_norm


def _model_with_grads(seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    m = nn.ModuleDict({"a": nn.Linear(512, 384), "b": nn.Linear(384, 7)})
    for p in m.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    m["a"].weight.grad[0, 0] = 5.0  # one outlier: the case where a fp32 vector_norm drifts
    return m


def test_norm_matches_float64_reference():
    m = _model_with_grads()
    want = torch.cat([p.grad.double().flatten() for p in m.parameters()]).norm()
    got = clip_grad_norm(m, 0.0)
    assert abs(float(got) - float(want)) / float(want) < 1e-6


def test_clipping_scales_every_grad_to_max_norm():
    m = _model_with_grads()
    before = [p.grad.clone() for p in m.parameters()]
    norm = clip_grad_norm(m, 1.0)
    assert norm > 1.0
    after = torch.cat([p.grad.flatten() for p in m.parameters()]).double().norm()
    assert abs(float(after) - 1.0) < 1e-5
    for b, p in zip(before, m.parameters(), strict=True):
        torch.testing.assert_close(p.grad, b / (norm + 1e-6))
    assert clip_grad_norm(m, 10.0) < 10.0  # under the limit: unchanged


def test_gradients_under_the_limit_are_left_as_they_are():
    m = _model_with_grads()
    before = [p.grad.clone() for p in m.parameters()]
    norm = clip_grad_norm(m, 100.0)
    assert 1.0 < norm < 100.0
    for b, p in zip(before, m.parameters(), strict=True):
        assert torch.equal(p.grad, b)  # never scaled up towards max_norm
