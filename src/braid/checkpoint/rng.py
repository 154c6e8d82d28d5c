"""Every random stream of one process, captured and restored exactly: python, numpy, torch, CUDA.

`capture(device)` returns plain data (ints, lists, tuples, uint8/uint32 arrays) that
`braid.checkpoint.state.encode` stores as JSON; `restore(snapshot, device)` puts the streams
back so the next draw from each is the draw the saving process would have made. Each rank
captures and restores its own streams (its own file in the checkpoint).

CUDA: the generator of this process's device only. A snapshot taken on a GPU and restored on a
CPU-only machine skips the CUDA stream (there is none to set); a CPU snapshot restored on a GPU
leaves the CUDA stream as seeded.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture(device: torch.device) -> dict[str, Any]:
    """The state of every RNG stream this process draws from."""
    snap: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state().numpy().copy(),
    }
    if device.type == "cuda":
        snap["cuda"] = torch.cuda.get_rng_state(device).numpy().copy()
    return snap


def restore(snap: dict[str, Any], device: torch.device) -> None:
    """Put back the streams captured by `capture` (raises ValueError/TypeError if malformed)."""
    version, internal, gauss = snap["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(snap["numpy"])
    torch.set_rng_state(torch.from_numpy(np.asarray(snap["torch"], dtype=np.uint8)))
    if device.type == "cuda" and "cuda" in snap:
        torch.cuda.set_rng_state(torch.from_numpy(np.asarray(snap["cuda"], dtype=np.uint8)), device)
