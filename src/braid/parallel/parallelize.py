"""Apply parallelism to a single-device model from outside, in a fixed, documented order.

Order (each step assumes the previous one):
  0. precision: with train.precision=fp8, swap linears and expert GEMMs to fp8 and let the
     dispatchers send fp8 (braid.parallel.fp8; before sharding, so it sees whole modules);
  1. expert parallelism: keep this rank's experts (as DTensors of global shape) and install
     the EP exchange in every MoE dispatcher; under pure data parallelism (ep = 1) the exchange
     has one rank and only sums router statistics over the world (braid.parallel.expert).
     In one process the local exchange stays, unless `exchange.algorithm = "simulated"`, which
     is installed instead (the local exchange taking a real one's time, docs/exchange.md);
  2. activation checkpointing per block (parallel.activation_checkpoint);
  3. torch.compile per block (train.compile), in reduce-overhead mode (CUDA graphs of each
     block's forward and backward) with train.cuda_graphs, which one GPU alone can take;
  4. data parallelism: FSDP2 `fully_shard` of experts over their dp group, then of each block
     and the root over all ranks (or replication), when there is more than one process
     (braid.parallel.data, which also sets the gradient scaling).
Steps 1 and 4 run whenever the context is distributed, even at ep = 1 or dp = 1, so every
layout has the same parameter types and state-dict keys.
The model is still on the meta device here; the caller materialises and initialises it after.
"""

from __future__ import annotations

from torch import nn

from braid.config import Config
from braid.errors import BraidError, ConfigError
from braid.exchange import get_exchange
from braid.parallel.mesh import ParallelContext


def parallelize(model: nn.Module, cfg: Config, ctx: ParallelContext) -> nn.Module:
    if cfg.train.cuda_graphs and (ctx.device.type != "cuda" or ctx.distributed):
        where = "several processes" if ctx.distributed else f"device {ctx.device.type}"
        raise ConfigError("train.cuda_graphs", True, f"needs one GPU alone (this run: {where})")
    if cfg.parallel.param_dtype != "fp32" and not ctx.distributed:
        raise BraidError(
            f"parallel.param_dtype={cfg.parallel.param_dtype} sets the dtype of FSDP units, which "
            "exist only under torchrun; in one process use train.dtype=bf16 (autocast) or fp32"
        )
    if cfg.train.precision == "fp8":
        from braid.parallel.fp8 import apply_fp8

        apply_fp8(model, cfg.train.fp8_skip, ctx.device, cfg.train.fp8_wgrad == "fp8")  # 0
    if ctx.distributed:
        from braid.parallel.expert import apply_expert_parallel

        apply_expert_parallel(model, cfg, ctx)  # 1
    elif cfg.exchange.algorithm == "simulated":
        from braid.parallel.expert import install_exchange

        sim = get_exchange("simulated", allow_import=False)
        install_exchange(model, sim(None, None, cfg.exchange))  # 1
    for block in model.all_blocks():  # the MTP modules' blocks included
        block.activation_checkpoint = cfg.parallel.activation_checkpoint  # 2
        if cfg.train.compile:  # 3: in place, so parameter names do not change
            block.compile(mode="reduce-overhead" if cfg.train.cuda_graphs else None)
    if ctx.distributed:
        from braid.parallel.data import apply_data_parallel

        apply_data_parallel(model, cfg, ctx)  # 4
    return model
