"""bf16 compute copies of the weights, cast once per optimizer step (`train.cast_weights_once`).

Under bf16 autocast every micro-step's forward casts each fp32 weight to bf16 again, and its
backward casts each bf16 weight gradient back to fp32: 12 bytes of memory traffic per weight
per micro-step, whatever the tokens. For a sparse MoE (most weights in experts that each see a
few tokens) that is a large share of the step: `moonlet`'s 7.3B weights move about 88 GB per
micro-step for 1.25B active ones. `StepCast` keeps the fp32 weights as the parameters (the
optimizer, clipping, checkpoints and exports see only them) and, for the micro-steps of one
optimizer step, swaps in bf16 copies cast once (`swapped`):
  1. enter: each weight's bf16 copy is refreshed from it (one cast per optimizer step, into
     buffers kept across steps, so CUDA graphs see the same addresses) and becomes its data;
  2. each micro-step runs forward and backward on the copies (autocast's casts are no-ops);
     each bf16 gradient moves into an fp32 one as soon as autograd has accumulated it (the
     first written, later ones added: the same adds in fp32 as autocast's cast-then-
     accumulate), and `collect()` moves those written directly (deferred dW);
  3. exit: collect once more, then each parameter gets back its fp32 data and its fp32 grad.
Results equal the autocast path's bit for bit in eager mode (the same bf16 weights, the same
bf16 GEMMs, the same fp32 accumulation); what is saved is the forward cast of every micro-step
after the first of a step. Within one backward several contributions to a swapped weight's
gradient add in bf16, as autocast sums the uses of one cached cast.

Which weights: those autocast casts in every forward anyway, the weights of `nn.Linear` modules
(attention, dense and shared FFNs, the output head) and the routed experts' `w13`/`w2`; not the
embeddings, norms or the router (kept in fp32 by the model), not fp8 modules (`Fp8Linear`,
experts with fp8 GEMMs: they quantise from the fp32 weights), not a weight tied to one of those.
With one micro-step per optimizer step (`feed_experts`, which `step_cast` sets for
`train.grad_accum = 1`) the routed experts' weights are not swapped: their copies are handed to
the module (`GroupedExperts.w13_compute` / `w2_compute`), whose GEMMs read them instead of
casting, while the fp32 weights stay its parameters; their dW reaches the fp32 grads as in the
autocast path, on a GPU with Triton written in fp32 by the dW GEMM itself
(`braid.ops.wgrad_triton`): 4 bytes a weight where a bf16 dW and its move into a new fp32 grad
take 8. With accumulation they are swapped like the linears: a later micro-step's bf16 dW added
into the fp32 grad moves 12 bytes a weight, where autograd adding an fp32 dW moves 16.
One process only: under torchrun, FSDP units cast per unit with `parallel.param_dtype`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from braid.errors import BraidError
from braid.ops.grad_cast import into_fp32


def compute_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weights a bf16 autocast forward casts every time (see the module docstring)."""
    from braid.model.fp8_linear import Fp8Linear
    from braid.moe.experts import GroupedExperts

    picked: list[nn.Parameter] = []
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and not isinstance(mod, Fp8Linear):
            picked.append(mod.weight)
        elif isinstance(mod, GroupedExperts) and mod.fp8_stats is None:
            picked += [mod.w13, mod.w2]
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    return [
        p
        for p in dict.fromkeys(picked)  # unique, in model order
        if p.requires_grad and uses.get(id(p), 0) == 1 and not hasattr(p, "to_local")
    ]


class StepCast:
    """The bf16 compute copies of `compute_weights(model)`, swapped in by `swapped()`."""

    def __init__(
        self, model: nn.Module, dtype: torch.dtype = torch.bfloat16, feed_experts: bool = False
    ):
        """`feed_experts`: hand the routed experts their copies instead of swapping them (for
        one micro-step per optimizer step; see the module docstring)."""
        from braid.moe.experts import GroupedExperts

        self.params = compute_weights(model)
        self.dtype = dtype
        self.copies = [torch.empty_like(p, dtype=dtype) for p in self.params]
        # Index -> (experts module, attribute): routed expert weights are not swapped; their
        # copy is handed to the module (`GroupedExperts.w13_compute`), see `swapped`.
        owner = {
            id(getattr(m, n)): (m, f"{n}_compute")
            for m in model.modules()
            if isinstance(m, GroupedExperts) and feed_experts
            for n in ("w13", "w2")
        }
        self.fed = {i: owner[id(p)] for i, p in enumerate(self.params) if id(p) in owner}
        self._data: list[Tensor | None] = [None] * len(self.params)
        self._grads: list[Tensor | None] = [None] * len(self.params)
        self.active = False

    @contextmanager
    def swapped(self) -> Iterator[StepCast]:
        """The micro-steps of one optimizer step (or a validation) run on the bf16 copies.
        Each copy's gradient is moved into the fp32 one as soon as autograd has accumulated it
        (a post-accumulate hook), so no bf16 gradient outlives its backward; `collect()` moves
        what was written directly (the overlap engine's deferred dW). On the way out, even by an
        exception, every parameter gets its fp32 data and gradient back."""
        if self.active:
            raise RuntimeError("StepCast.swapped() is not re-entrant")
        self.refresh()
        self.active = True
        hooks = []
        try:
            for i, p in enumerate(self.params):
                if i in self.fed:  # the experts' GEMMs read the copy, dW goes to `p` itself
                    setattr(*self.fed[i], self.copies[i])
                    continue
                self._data[i], self._grads[i] = p.data, p.grad
                p.grad = None
                p.data = self.copies[i]
                hooks.append(p.register_post_accumulate_grad_hook(lambda p, i=i: self._take(i)))
            yield self
        finally:
            try:
                self.collect()
            finally:
                for h in hooks:
                    h.remove()
                for mod, attr in self.fed.values():
                    setattr(mod, attr, None)
                for i, p in enumerate(self.params):
                    if self._data[i] is None:  # never swapped in
                        continue
                    p.grad = None
                    p.data, p.grad = self._data[i], self._grads[i]
                    self._data[i] = self._grads[i] = None
                self.active = False

    @torch.no_grad()
    def refresh(self) -> None:
        """Cast the fp32 weights into their bf16 copies: the one cast of a step (inside the
        swap too, from the fp32 data held aside; never with a backward pending, whose saved
        copies it would overwrite: autograd refuses that backward)."""
        for i, (p, c) in enumerate(zip(self.params, self.copies, strict=True)):
            held = self._data[i]  # swapped in: the fp32 data held aside
            c.copy_(held if held is not None else p)

    def drop_grads(self) -> None:
        """Forget the fp32 gradients collected so far (a benchmark's micro-steps), the fed
        experts' too (theirs are their weights' own grads)."""
        self._grads = [None] * len(self.params)
        for i in self.fed:
            self.params[i].grad = None

    def collect(self) -> None:
        """Move the copies' bf16 gradients into the weights' fp32 gradients (after each
        micro-step's backward, and after deferred weight gradients were flushed)."""
        for i in range(len(self.params)):
            if i not in self.fed:
                self._take(i)

    def _take(self, i: int) -> None:
        p = self.params[i]
        g = p.grad
        if g is None:
            return
        p.grad = None
        held = self._grads[i]
        if self._data[i].dtype == torch.float32:  # one vectorized pass (`braid.ops.grad_cast`)
            self._grads[i] = into_fp32(held, g)
        elif held is None:
            self._grads[i] = g.to(self._data[i].dtype)
        else:
            held.add_(g)


def check_cast(enabled: bool, compute: torch.dtype, world: int) -> None:
    """A one-line error where `train.cast_weights_once` cannot apply (before a run starts)."""
    if not enabled:
        return
    if world > 1:
        raise BraidError(
            "train.cast_weights_once=true needs one process (under torchrun, FSDP units cast "
            "per unit: parallel.param_dtype=bf16)"
        )
    if compute != torch.bfloat16:
        raise BraidError(
            f"train.cast_weights_once=true needs a bf16 compute dtype, not {compute} "
            "(train.dtype=bf16, or auto on a GPU)"
        )


def step_cast(
    model: nn.Module, enabled: bool, compute: torch.dtype, world: int, micro_steps: int = 1
) -> StepCast | None:
    """`StepCast` for `train.cast_weights_once`, or None when it is off (`check_cast` first);
    the experts are fed their copies where each optimizer step has one micro-step."""
    check_cast(enabled, compute, world)
    return StepCast(model, compute, feed_experts=micro_steps == 1) if enabled else None
