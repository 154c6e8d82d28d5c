"""`train.precision=fp8`: switch a single-device model's GEMMs to fp8, from outside.

Applied first by `parallelize` (on the meta device, before sharding):
  * every `nn.Linear` whose path is not matched by `train.fp8_skip` becomes an `Fp8Linear`
    (attention projections, dense FFNs, shared experts; the output head is skipped by default;
    dW in fp8 too with train.fp8_wgrad=fp8);
  * every MoE layer's routed experts (unless skipped) run `fp8_swiglu_experts` (dW in fp8 too
    with train.fp8_wgrad=fp8), and its dispatcher quantises the rows once before the
    exchange and sends them as fp8;
  * one `Fp8Stats` is attached to the model (`model.fp8_stats`) and to every fp8 module.
The router (not a linear; fp32 inside), norms, softmax and the loss keep their precision.
A skip entry matches a module by glob against its dotted path or any one part of it, so
`experts`, `attn`, `blocks.0.*` and `wq` all work. Linears with fewer than 16 inputs or
outputs (a shared expert's gate, say) are GEMVs, not GEMMs, and stay as they are. Otherwise
fp8 GEMMs on CUDA need both dims of every weight to be multiples of 16 (the kernels'
alignment); a module that is not is refused with its name, so the run never silently mixes
precisions. A CUDA GPU without torch's fp8 grouped GEMM (anything but SM90 and SM100) is
refused by name.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch
from torch import nn

from braid.errors import BraidError
from braid.model.fp8_linear import Fp8Linear
from braid.moe.fp8_dispatch import Fp8Send
from braid.moe.layer import MoE
from braid.ops.fp8_stats import Fp8Stats

SMALLEST = 16  # linears with a dim below this (gates, scalar heads) keep the compute dtype


def skipped(path: str, patterns: list[str]) -> bool:
    """Whether module `path` matches a `train.fp8_skip` entry (whole path or any part)."""
    parts = path.split(".")
    return any(fnmatchcase(path, p) or any(fnmatchcase(s, p) for s in parts) for p in patterns)


def _check_aligned(path: str, dims: tuple[int, ...]) -> None:
    if any(d % 16 for d in dims):
        raise BraidError(
            f"train.precision=fp8: {path} has dims {dims}, but fp8 GEMMs on CUDA need multiples "
            f"of 16; add it to train.fp8_skip (e.g. --train.fp8_skip='[..., \"{path}\"]')"
        )


FP8_GROUPED_SM = (9, 10)  # torch._scaled_grouped_mm's CUDA capabilities (Hopper, Blackwell DC)


def _check_gpu(device: torch.device) -> None:
    if not torch.cuda.is_available() or torch.version.hip is not None:
        return  # building for a GPU elsewhere (tests on the meta device), or ROCm: not checked
    major, minor = torch.cuda.get_device_capability(device)
    if major not in FP8_GROUPED_SM:
        name = torch.cuda.get_device_name(device)
        raise BraidError(
            f"train.precision=fp8 needs an SM90 or SM100 GPU (H100, H200, B200) for its fp8 "
            f"grouped GEMMs; {name} is SM{major}{minor}: use train.precision=bf16"
        )


def apply_fp8(
    model: nn.Module, skip: list[str], device: torch.device, fp8_wgrad: bool = False
) -> Fp8Stats:
    """Swap the model's GEMMs to fp8 in place (see the module docstring); returns the stats."""
    stats = Fp8Stats()
    on_cuda = device.type == "cuda"
    if on_cuda:
        _check_gpu(device)
    for path, mod in model.named_modules():
        if skipped(path, skip):
            continue
        if type(mod) is nn.Linear:
            if min(mod.weight.shape) < SMALLEST:
                continue  # a gate or a head of a few outputs: no GEMM worth quantising
            if on_cuda:
                _check_aligned(path, tuple(mod.weight.shape))
            mod.__class__ = Fp8Linear
            mod.fp8_stats, mod.fp8_name, mod.fp8_wgrad = stats, path, fp8_wgrad
        elif isinstance(mod, MoE) and not skipped(f"{path}.experts", skip):
            ex = mod.experts
            if on_cuda:
                _check_aligned(f"{path}.experts", (ex.dim, ex.hidden))
            ex.fp8_stats, ex.fp8_name, ex.fp8_wgrad = stats, f"{path}.experts", fp8_wgrad
            mod.dispatcher.send_fp8 = Fp8Send(stats, f"{path}.experts.w13")
    model.fp8_stats = stats
    return stats
