"""The overlap engine's FSDP expert unit (`braid.overlap.fsdp_unit.HeldUnit`) in one process:
the experts dressed as an FSDP2 unit (the methods `HeldUnit` calls, logged) show, per layer
call, ONE gather before the first chunk and one reshard after the last in forward, and in
backward the gradient sync and reshard switched off until the flush point, then restored as
they were (a no-sync micro-step stays no-sync) and the unit's one post-backward. The numbers
are the plain path's (the local exchange; the unit's methods move nothing)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from braid.overlap.engine import LayerOverlap
from braid.overlap.streams import Clock
from small_moe import moe_step, seeded_moe

C = 3


def _as_fsdp_unit(experts: torch.nn.Module, log: list[str], sync: bool) -> list:
    """Give `experts` the FSDP2 unit API that `HeldUnit` uses, each call appended to `log`;
    its one param group reduces grads iff `sync` (False: a no-sync micro-step). Returns the
    experts' grads as the post-backward (the reduce-scatter) saw them."""
    seen: list = []

    def post_backward() -> None:
        log.append("post_backward")
        seen.extend(None if p.grad is None else p.grad.clone() for p in experts.parameters())

    group = SimpleNamespace(
        reduce_grads=sync,
        reshard_after_backward=True,
        fsdp_params=[],
        post_backward=post_backward,
    )
    state = SimpleNamespace(_fsdp_param_groups=[group])
    experts.unshard = lambda: log.append("unshard")
    experts.reshard = lambda: log.append("reshard")
    experts.set_reshard_after_forward = lambda v, recurse: log.append(f"reshard_fwd {v}")
    experts.set_reshard_after_backward = lambda v, recurse: log.append(f"reshard_bwd {v}")
    experts.set_requires_gradient_sync = lambda v, recurse: log.append(f"sync {v}")
    experts._get_fsdp_state = lambda: state
    experts.register_forward_pre_hook(lambda m, a: log.append("call"))
    return seen


@pytest.mark.parametrize("sync", [True, False])
def test_the_expert_unit_is_gathered_once_held_and_restored_as_it_was(sync):
    base = seeded_moe(num_shared_experts=1)
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))
    ref = moe_step(copy.deepcopy(base), x)
    moe, log = base, []
    seen = _as_fsdp_unit(moe.experts, log, sync)
    moe.overlap = LayerOverlap(0, C, True, Clock(torch.device("cpu")))
    got = moe_step(moe, x)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    forward = ["unshard", "reshard_fwd False", *["call"] * C, "reshard_fwd True", "reshard"]
    backward = ["sync False", "reshard_bwd False", f"sync {sync}", "reshard_bwd True"]
    assert log == forward + backward + ["post_backward"], log
    final = [p.grad for p in moe.experts.parameters()]  # every deferred dW ran before it
    assert len(seen) == len(final)
    assert all(a is not None and torch.equal(a, b) for a, b in zip(seen, final, strict=True))


def test_a_unit_held_twice_is_restored_to_its_state_before_the_first_hold():
    from braid.overlap.fsdp_unit import HeldUnit

    experts, log = torch.nn.Linear(2, 2), []
    _as_fsdp_unit(experts, log, sync=True)
    unit = HeldUnit(experts)
    unit.hold()
    unit.hold()  # e.g. a second layer call's backward before the flush point
    unit.reduce()
    unit.reduce()  # a second flush: nothing more
    assert log == ["sync False", "reshard_bwd False", "sync True", "reshard_bwd True"] + [
        "post_backward"
    ], log
