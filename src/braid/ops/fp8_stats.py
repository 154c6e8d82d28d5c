"""Numerics of the fp8 casts, accumulated on the device and read at log steps (`fp8/*` metrics).

For each named operand (say `blocks.1.ffn.experts.w13/x` or `.../grad`) it keeps the largest
|x| seen and the fraction of elements that were nonzero but quantised to zero (underflow: a
scale set by a few huge values pushes the rest below e4m3's smallest subnormal). A rising
underflow fraction or an amax drifting by orders of magnitude shows a scale going wrong before
the loss does. Recording costs an extra pass over the operand, so it runs only while `active`
(the trainer switches it on for the last step of each log interval) and never inside a compiled
region (the counters are Python-side state); nothing syncs with the host until `read`.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Fp8Stats:
    def __init__(self) -> None:
        self.active = False
        self._acc: dict[str, Tensor] = {}  # name -> [amax, underflow count, element count]

    def record(self, name: str, x: Tensor, q: Tensor) -> None:
        """Fold operand `x` and its e4m3 codes `q` (same shape) into `name`'s counters."""
        if not self.active or torch.compiler.is_compiling() or x.numel() == 0:
            return
        with torch.no_grad():
            flushed = ((q.view(torch.uint8) & 0x7F) == 0) & (x != 0)  # +0 and -0 codes
            new = torch.stack(
                [
                    x.detach().abs().amax().float(),
                    flushed.sum().float(),
                    torch.tensor(float(x.numel()), device=x.device),
                ]
            )
            acc = self._acc.get(name)
            if acc is None:
                self._acc[name] = new
            else:
                acc[0] = torch.maximum(acc[0], new[0])
                acc[1:] += new[1:]

    def read(self) -> dict[str, float]:
        """`fp8/<name>/amax` and `fp8/<name>/underflow` since the last read (one host sync)."""
        if not self._acc:
            return {}
        names = sorted(self._acc)
        vals = torch.stack([self._acc[n] for n in names]).tolist()
        self._acc.clear()
        out: dict[str, float] = {}
        for n, (amax, flushed, count) in zip(names, vals, strict=True):
            out[f"fp8/{n}/amax"] = amax
            out[f"fp8/{n}/underflow"] = flushed / max(count, 1.0)
        return out
