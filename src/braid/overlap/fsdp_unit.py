"""The routed experts as an FSDP2 unit (dp > 1): gathered once and reduced once per layer.

FSDP2 unshards a unit in a hook before each forward call and reshards after it, and
reduce-scatters its gradients in a hook on the gradient of each call's input. The chunked
pipeline calls the experts once per chunk, and with split_dw their weight gradients come
after that input gradient, so left alone FSDP2 would gather C times in each direction,
reduce-scatter C times, and miss every deferred dW. `ExpertUnit` takes the unit through a
layer instead:
  forward:  `gather()` before the first chunk (reshard-after-forward off), `release()` after
            the last (reshard, setting restored);
  backward: `hold()` before the first chunk (no reduce-scatter, no reshard: per-chunk grads
            accumulate unsharded), `reduce()` at the layer's flush point, after every deferred
            dW of the layer has run: the unit's one reduce-scatter and its reshard.
`reduce()` calls the unit's own post-backward step (FSDP2's `FSDPParamGroup.post_backward`,
a private torch API that FSDP2 documents as idempotent, and which its root callback runs at
the end of backward for any unit that did not run it); everything else is FSDPModule's public
API. A module that is no FSDP unit (dp = 1) makes every method a no-op.
"""

from __future__ import annotations

from typing import Any


def is_fsdp_unit(module: Any) -> bool:
    return hasattr(module, "unshard") and hasattr(module, "set_requires_gradient_sync")


class ExpertUnit:
    def __init__(self, experts: Any):
        self.module = experts if is_fsdp_unit(experts) else None
        self.held = False
        self._sync = True

    def _groups(self) -> list:
        return list(self.module._get_fsdp_state()._fsdp_param_groups)

    def gather(self) -> None:
        if self.module is not None:
            self.module.unshard()
            self.module.set_reshard_after_forward(False, recurse=False)

    def release(self) -> None:
        if self.module is not None:
            self.module.set_reshard_after_forward(True, recurse=False)
            self.module.reshard()

    def hold(self) -> None:
        if self.module is None or self.held:
            return
        self._sync = all(g.reduce_grads for g in self._groups())  # a no-sync micro-step stays so
        self.module.set_requires_gradient_sync(False, recurse=False)
        self.module.set_reshard_after_backward(False, recurse=False)
        self.held = True

    def reduce(self) -> None:
        if not self.held:
            return
        self.held = False
        self.module.set_requires_gradient_sync(self._sync, recurse=False)
        self.module.set_reshard_after_backward(True, recurse=False)
        for group in self._groups():
            group.post_backward()
