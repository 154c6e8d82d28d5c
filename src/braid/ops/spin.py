"""Hold a CUDA stream for a set time: the simulated exchange's stand-in for a transfer.

`spin(ms)` enqueues on the current stream a one-block kernel that ends `ms` after it starts.
With Triton it spins on the GPU's `%globaltimer` (nanoseconds, independent of the SM clock);
without it, `torch.cuda._sleep` spins for a number of SM clock cycles measured once per
device, which drifts when the clock changes with load, power or temperature (seen in the GPU
timing test on an H100: movements ran long).
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

if triton is not None:

    @triton.jit
    def _now():
        return tl.inline_asm_elementwise(
            "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
        )

    @triton.jit(do_not_specialize=["ns"])  # one compiled kernel for every duration
    def _spin_kernel(ns):
        start = _now()
        now = start
        while now - start < ns:
            now = _now()


@functools.cache
def _cycles_per_ms(device: torch.device) -> float:
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 2_000_000
    torch.cuda._sleep(cycles)  # warm-up
    a.record()
    torch.cuda._sleep(cycles)
    b.record()
    b.synchronize()
    return cycles / a.elapsed_time(b)


def spin(ms: float, device: torch.device | None = None) -> None:
    """Occupy the current CUDA stream of `device` for `ms` milliseconds (nothing if ms <= 0).
    With `device=None`, the current device's current stream, launched without a device guard."""
    if ms <= 0:
        return
    if triton is not None:
        # The current device needs no device guard to enter and leave.
        with nullcontext() if device is None else torch.cuda.device(device):
            _spin_kernel[(1,)](int(ms * 1e6), num_warps=1)
        return
    device = device or torch.device("cuda", torch.cuda.current_device())
    with torch.cuda.device(device):
        torch.cuda._sleep(int(ms * _cycles_per_ms(device)))
