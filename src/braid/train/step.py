"""Applying optimizer steps without waiting for the host: the non-finite check runs on the device.

The reference loop (`trainer._loop` with the host gate) reads the loss and the gradient norm on
the host every step (one `.tolist()`) to decide whether the update applies. `DeviceGate` decides
on the device instead and keeps what the host needs until it asks (at log, validation and
checkpoint steps, on a stop signal and at the end: `read`, one host sync):
  1. finite = isfinite(loss) and isfinite(grad norm), a 0-d bool tensor;
  2. the update is masked with it: a fused optimizer takes `found_inf` (the tensor the AMP grad
     scaler hands it) and leaves parameters, moments and step counts untouched where it is 1;
  3. the first non-finite step, which of the two was not finite and the index of the first
     parameter whose gradient sum of squares was not finite are recorded on the device;
  4. without `skip_nonfinite`, every update after the first non-finite step is masked too, so
     when the host reads the gate (at the latest before the next checkpoint) the run stops with
     the weights of the last good step, as the reference stops at the bad step itself.
Only optimizers with fused kernels take `found_inf` (torch.optim.AdamW(fused=True), on CUDA
and on CPU); the trainer uses the host gate otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class GateView:
    """What the host reads from a `DeviceGate` (all Python numbers)."""

    skipped: int  # steps masked since the gate was made
    bad_step: int  # first step whose loss or grad norm was not finite (-1: none)
    bad_loss: bool  # that step's loss was not finite (else only its grad norm)
    bad_param: int  # index into that step's `names` of its first non-finite gradient (-1: none)
    loss: float  # loss of the last applied step (the initial value if none was applied)
    grad_norm: float  # grad norm of the last step, applied or not


def supports_device_gate(opt: torch.optim.Optimizer) -> bool:
    """True for optimizers whose step takes a device-side `found_inf` mask (fused kernels)."""
    return bool(opt.defaults.get("fused"))


class DeviceGate:
    def __init__(self, device: torch.device, *, skip_nonfinite: bool, loss: float = float("nan")):
        def scalar(v, dtype):
            return torch.full((), v, dtype=dtype, device=device)

        self.skip_nonfinite = skip_nonfinite
        self.skipped = scalar(0, torch.long)
        self.bad_step = scalar(-1, torch.long)
        self.bad_loss = scalar(False, torch.bool)
        self.bad_param = scalar(-1, torch.long)
        self.loss = scalar(loss, torch.float32)
        self.grad_norm = scalar(float("nan"), torch.float32)
        self.names: Sequence[str] = ()  # parameter names of the first bad step's `sums_P`
        self._names_now: Sequence[str] = ()

    @torch.no_grad()
    def step(
        self,
        opt: torch.optim.Optimizer,
        step: int,
        loss: Tensor,
        grad_norm: Tensor,
        sums_P: Tensor | None = None,
        names: Sequence[str] = (),
    ) -> Tensor:
        """Run `opt.step()` for step number `step`, masked on the device when the step must not
        apply; returns the 0-d bool tensor `applied`. `sums_P` are the per-parameter sums of
        squared gradients (named by `names`) that locate the first bad gradient."""
        loss, grad_norm = loss.float(), grad_norm.float().to(loss.device)
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        first = ~finite & (self.bad_step < 0)
        self.bad_step = torch.where(first, step, self.bad_step)
        self.bad_loss = torch.where(first, ~torch.isfinite(loss), self.bad_loss)
        if sums_P is not None and sums_P.numel():
            bad_P = ~torch.isfinite(sums_P)
            idx = torch.where(bad_P.any(), bad_P.int().argmax(), -1)
            self.bad_param = torch.where(first, idx, self.bad_param)
            # Which names the index refers to is known on the host only if the set of
            # parameters with gradients never changes; keep the latest list (a reference).
            self._names_now = names
        applied = finite if self.skip_nonfinite else finite & (self.bad_step < 0)
        opt.found_inf = (~applied).float()
        try:
            opt.step()
        finally:
            del opt.found_inf
        self.skipped += (~applied).long()
        self.loss = torch.where(applied, loss, self.loss)
        self.grad_norm = grad_norm
        return applied

    def read(self) -> GateView:
        """One host sync: everything the host reports or decides on."""
        skipped, bad_step, bad_loss, bad_param = torch.stack(
            [self.skipped, self.bad_step, self.bad_loss.long(), self.bad_param]
        ).tolist()
        loss, grad_norm = torch.stack([self.loss, self.grad_norm]).tolist()
        self.names = self._names_now
        return GateView(skipped, bad_step, bool(bad_loss), bad_param, loss, grad_norm)

    def culprit(self, view: GateView) -> str:
        """Name of the first non-finite gradient of the first bad step, or "unknown"."""
        if 0 <= view.bad_param < len(self.names):
            return self.names[view.bad_param]
        return "unknown"
