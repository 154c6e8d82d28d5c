"""The shared experts beside the first dispatch and the last combine (`overlap.split_dw`).

No chunk's experts overlap the pipeline's fill (the first dispatch) and drain (the last
combine), and the shared experts need no exchange: so with split_dw the pipeline runs them in
two token halves, the first (`half_tokens`) beside the fill, the rest beside the drain
(`braid.overlap.pipeline`). Each half's dW operands wait in a `JoinedWgrad` until both halves'
backward ran; then one GEMM per weight over all tokens goes to the layer's dW queue: the
weight grads of the unsplit computation, from the same operands.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from braid.ops.swiglu import gated
from braid.overlap.wgrad import JoinedWgrad, split_linear, swiglu_split_dw


def joined_side(shared: Any, gate: Any | None, joined: JoinedWgrad) -> Callable:
    """The shared experts (and their gate, a bias-free linear) of token half h, every weight's
    dW joined over both halves: one GEMM per weight, as without the split."""

    def side(x: Tensor, h: int) -> Tensor:
        block = joined.block(h)
        g = gate
        if gate is not None and getattr(gate, "bias", None) is None:
            g = lambda t: split_linear(t, gate.weight, block)  # noqa: E731
        return gated(swiglu_split_dw(shared, x, block), x, g)

    return side


def half_tokens(n: int) -> int:
    """Where the shared experts' tokens split between the fill and the drain: the first half
    (rounded down) beside the first dispatch, the rest beside the last combine."""
    return n // 2
