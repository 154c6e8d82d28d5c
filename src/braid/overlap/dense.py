"""split_dw = "all": attention and dense-FFN weight grads deferred into MoE exchange windows.

Job: give the exchange windows of each MoE layer's backward the weight-gradient GEMMs (dW) of
the blocks above it, which have nothing else to wait for; the top MoE layer also takes the
untied output head's dW (the largest dense GEMM of the model: vocabulary x dim x tokens).

Why it is correct to wait: backward runs the blocks in reverse. MoE layer l's backward needs the
gradient of its output, which is complete only once every block above it (i > l) has run its
whole backward; so when l's exchanges are issued, the dW of those blocks' attention projections
(and dense FFNs) is known and nothing needs it until the optimizer reads the gradients. Block
i's dW therefore waits for the nearest MoE layer below it, l = max{MoE layers < i} (block i's own
MoE layer, if any, runs its backward before block i's attention, so it cannot take that dW).
The head runs its backward before every block, so its dW waits for the top MoE layer (the
MTP modules' head calls too: their backward also comes before the main model's blocks).

Phases:
  install  `defer_dense(model, layers)` (called by `OverlapSession.install`): for each block of
           the main model with an MoE layer below it, every plain `nn.Linear` of its attention
           (and of its FFN when dense) becomes a `DeferredLinear` (a class swap: parameters,
           names, state dict, init and FSDP wrapping unchanged) whose sink is
           `layers[l].dense_sink(HeldUnit(block))`; an untied head `nn.Linear` likewise, into
           the top MoE layer, with `HeldUnit(head)` (with FSDP2 the head is a unit of its own,
           `braid.parallel.data.fsdp_units`: its class is FSDP2's subclass of `nn.Linear`, and
           becomes the same kind of subclass of `DeferredLinear`, FSDPModule first);
  backward a `DeferredLinear` computes dX at once and pushes its dW into layer l's `dense`
           queue (`split_linear`); with FSDP2 the block's unit is held on the first push: no
           reduce-scatter when the gradient leaves the block (`braid.overlap.fsdp_unit`);
           layer l's pipeline drains `dense` in its windows after its own queue;
  flush    at layer l's flush point (its MoE input) the rest of `dense` runs, then each held
           block unit is reduce-scattered once: all before the gradient leaves block l, and
           before the trainer's `OverlapSession.flush()` and clipping.
`restore_dense(model)` swaps every `DeferredLinear` back (an install without "all").

Not deferred (dW at once, as before): blocks at or below the lowest MoE layer (no window comes
after them in backward), the MTP modules' blocks, the embedding, a tied head (the embedding's
matrix, read by `F.linear` outside any module), norms and routers, fp8 linears
(train.precision=fp8: their own GEMMs), and linears inside a torch.compile'd block (traced as
plain `nn.Linear`; `DeferredLinear.forward`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from braid.errors import BraidError
from braid.overlap.fsdp_unit import HeldUnit
from braid.overlap.wgrad import Task, split_linear


class DeferredLinear(nn.Linear):
    """`nn.Linear` whose weight gradient goes to `wgrad_sink` in backward (`split_linear`: the
    same casts as autocast). The bias gradient is autograd's, at once. Without a sink, without
    grad, or while torch.compile traces it, it is `nn.Linear` itself."""

    wgrad_sink: Callable[[Task], None] | None = None

    def forward(self, x: Tensor) -> Tensor:
        sink = self.wgrad_sink
        if sink is None or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return super().forward(x)
        y = split_linear(x, self.weight, sink)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def deferred_parts(block: Any, is_moe: bool) -> list[nn.Module]:
    """The parts of a block whose linears defer their dW: attention, and the FFN when dense."""
    return [block.attn] if is_moe else [block.attn, block.ffn]


def defer_dense(model: nn.Module, layers: dict[int, Any]) -> dict[int, int]:
    """Route the attention / dense-FFN dW of each block above an MoE layer into that layer's
    windows, and an untied head's into the top one's (`layers`: MoE index -> `LayerOverlap`
    with split_dw on). Returns {block index, or `HEAD`: MoE layer index} of what was deferred."""
    restore_dense(model)
    blocks = list(model.blocks)  # the main model's; the MTP modules' stay as they are
    moe_ids = set(model.moe_modules())
    targets = sorted(i for i, lo in layers.items() if i < len(blocks) and lo.split_dw)
    where: dict[int, int] = {}
    for i, block in enumerate(blocks):
        below = [m for m in targets if m < i]
        if not below:
            continue  # nothing fills a window after this block in backward: dW at once
        sink = layers[below[-1]].dense_sink(HeldUnit(block))
        for part in deferred_parts(block, i in moe_ids):
            for mod in part.modules():
                if type(mod) is nn.Linear:
                    _defer(mod, sink)
        where[i] = below[-1]
    head = getattr(model, "output", None)
    if targets and head is not None and _plain_linear(head):  # the top MoE layer's windows
        _defer(head, layers[targets[-1]].dense_sink(HeldUnit(head)))
        where[HEAD] = targets[-1]
    return where


HEAD = -1  # `defer_dense`'s key for the output head


def _no_deepcopy(self: Any, memo: Any) -> None:
    raise TypeError("an FSDP2 unit cannot be deep-copied (as with FSDP2's own classes)")


# FSDP2's class for a DeferredLinear unit, made as fully_shard makes one (FSDPModule first,
# so its `_orig_cls_mro_index` finds DeferredLinear; no deepcopy).
_FSDP_DEFERRED = type(
    "FSDPDeferredLinear", (FSDPModule, DeferredLinear), {"__deepcopy__": _no_deepcopy}
)


def _plain_linear(mod: nn.Module) -> bool:
    """`nn.Linear` itself, or FSDP2's class for an `nn.Linear` unit (FSDPModule, nn.Linear)."""
    return type(mod) is nn.Linear or type(mod).__mro__[1:3] == (FSDPModule, nn.Linear)


def _defer(mod: nn.Linear, sink: Callable[[Task], None]) -> None:
    """A class swap to `DeferredLinear`, or to `_FSDP_DEFERRED` for an FSDP2 unit, remembering
    the unit's class; `restore_dense` undoes it."""
    if type(mod) is not nn.Linear:
        mod.__dict__["_undeferred_class"] = type(mod)
    mod.__class__ = DeferredLinear if type(mod) is nn.Linear else _FSDP_DEFERRED
    mod.wgrad_sink = sink


def restore_dense(model: nn.Module) -> int:
    """Swap every `DeferredLinear` back to `nn.Linear`; returns how many."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, DeferredLinear):
            if type(mod) not in (DeferredLinear, _FSDP_DEFERRED):  # wrapped after the install
                raise BraidError(
                    f"overlap: {type(mod).__name__} was wrapped after split_dw='all' deferred "
                    "its dW; install the overlap engine after parallelizing the model"
                )
            mod.__class__ = mod.__dict__.pop("_undeferred_class", nn.Linear)
            mod.__dict__.pop("wgrad_sink", None)
            n += 1
    return n
