"""An FSDP2 unit held by the overlap engine: gathered once and reduced once per layer.

FSDP2 unshards a unit in a hook before each forward call and reshards after it, and
reduce-scatters its gradients in a hook on the gradient of each call's input. A deferred
weight gradient comes after that hook, so it would miss the reduce-scatter. Two units meet this:
  * the routed experts (dp > 1): the chunked pipeline calls them once per chunk, and with
    split_dw their dW comes after the input gradient, so left alone FSDP2 would gather C times
    in each direction, reduce-scatter C times, and miss every deferred dW;
  * a transformer block (any world > 1) whose attention / dense-FFN dW is deferred into the
    exchange windows of an MoE layer below it (split_dw = "all", `braid.overlap.dense`).
`HeldUnit` takes the unit through a layer instead:
  forward:  `gather()` before the first chunk (reshard-after-forward off), `release()` after
            the last (reshard, setting restored) — the experts only;
  backward: `hold()` before the first deferred dW (no reduce-scatter, no reshard: grads
            accumulate unsharded), `reduce()` at the flush point of the MoE layer whose queue
            holds the unit's dW, after that dW has run: the unit's one reduce-scatter and reshard.
`reduce()` calls the unit's own post-backward step (FSDP2's `FSDPParamGroup.post_backward`,
a private torch API that FSDP2 documents as idempotent, and which its root callback runs at
the end of backward for any unit that did not run it), after bringing the grads to one dtype
(`_uniform_grads`, FSDPParam's own accumulate/upcast steps); everything else is FSDPModule's
public API. A module that is no FSDP unit (dp = 1, one process) makes every method a no-op.
"""

from __future__ import annotations

from typing import Any


def is_fsdp_unit(module: Any) -> bool:
    return hasattr(module, "unshard") and hasattr(module, "set_requires_gradient_sync")


class HeldUnit:
    def __init__(self, module: Any):
        self.module = module if is_fsdp_unit(module) else None
        self.held = False
        self._sync, self._reshard = True, True

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
        groups = self._groups()
        self._sync = all(g.reduce_grads for g in groups)  # a no-sync micro-step stays so
        self._reshard = all(g.reshard_after_backward for g in groups)
        self.module.set_requires_gradient_sync(False, recurse=False)
        self.module.set_reshard_after_backward(False, recurse=False)
        self.held = True

    def reduce(self) -> None:
        if not self.held:
            return
        self.held = False
        self.module.set_requires_gradient_sync(self._sync, recurse=False)
        self.module.set_reshard_after_backward(self._reshard, recurse=False)
        for group in self._groups():
            _uniform_grads(group)
            group.post_backward()


def _uniform_grads(group: Any) -> None:
    """One gradient dtype for the reduce-scatter. With a reduce dtype (bf16 parameters, fp32
    reduction), FSDP2's held post-backward moved the grads known then to fp32 accumulators;
    a deferred dW arrives later in the parameter's bf16. Add it into its accumulator, and where
    some grads are accumulators, move the bf16-only ones to fp32 too (the reduce-scatter's
    dtype anyway). A unit whose grads all came deferred (the experts) is left as it is."""
    params = [fp for fp in group.fsdp_params if hasattr(fp, "_unsharded_param")]
    for fp in params:
        fp.accumulate_unsharded_grad_if_needed()
    if any(fp.unsharded_accumulated_grad is not None for fp in params):
        for fp in params:
            fp.to_accumulated_grad_if_needed()
