"""What a micro-step and a validation compute: the autocast context, the loss (cross-entropy,
router losses, multi-token prediction) and the validation mean; the trainer, the benchmarks
and `braid generate` share them."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from braid.config import Config
from braid.parallel.mesh import ParallelContext


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """bf16 on GPU (train.dtype auto/bf16), fp32 on CPU unless bf16 is asked for."""
    use_bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda")
    return torch.bfloat16 if use_bf16 else torch.float32


def stream_dtype(cfg: Config, device: torch.device, distributed: bool) -> torch.dtype:
    """The residual stream's dtype (what an MoE layer's dispatch carries): bf16 under FSDP's
    bf16 parameters (`parallel.param_dtype`, distributed runs) or with `model.residual =
    "compute"` and a bf16 compute dtype, else fp32 (the embedding's)."""
    if distributed and cfg.parallel.param_dtype == "bf16":
        return torch.bfloat16
    if cfg.model.residual == "compute":
        return compute_dtype(cfg, device)
    return torch.float32


def autocast(cfg: Config, device: torch.device):
    """bf16 autocast where the compute dtype is bf16 (`compute_dtype`), else nothing."""
    if compute_dtype(cfg, device) != torch.bfloat16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def loss_fn(model, x, y, cfg: Config, amp) -> tuple[torch.Tensor, dict]:
    """CE + weighted router losses on one micro-batch; returns the loss and its parts."""
    with amp:
        out = model(x)
    ce = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())
    loss = ce + cfg.moe.aux_loss_coef * out.aux_loss + cfg.moe.z_loss_coef * out.z_loss
    parts = {
        "ce": ce.detach(),
        "aux": out.aux_loss.detach(),
        "z": out.z_loss.detach(),
        "moe": out.moe,
    }
    if out.mtp_logits:  # DeepSeek-V3 eq. 25: lambda / D * sum_k CE_k
        mtp = mtp_loss(out.mtp_logits, y)
        loss = loss + cfg.model.mtp_loss_weight * mtp
        parts["mtp"] = mtp.detach()
    return loss, parts


def mtp_loss(mtp_logits: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """Mean over depths of depth k's cross-entropy against the targets shifted by k."""
    losses = [
        F.cross_entropy(lg.float().flatten(0, 1), y[:, k:].flatten())
        for k, lg in enumerate(mtp_logits, start=1)
    ]
    return torch.stack(losses).mean()


@torch.no_grad()
def evaluate(model, batches, cfg: Config, amp, ctx: ParallelContext) -> float | None:
    """Mean cross-entropy over fixed validation batches (averaged over ranks); None when
    validation is off (train.val_batches = 0)."""
    if cfg.train.val_batches == 0:
        return None
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=ctx.device)
    for x, y in batches:
        if cfg.train.cuda_graphs:  # a new replay, as in training: the last outputs are dead
            torch.compiler.cudagraph_mark_step_begin()
        with amp:
            logits = model(x.to(ctx.device)).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), y.to(ctx.device).flatten())
    model.train(was_training)
    mean = total / max(1, len(batches))
    if ctx.distributed:
        from braid.parallel.distributed import all_reduce_mean

        mean = all_reduce_mean(mean, ctx)
    return float(mean)  # host sync, once per validation
