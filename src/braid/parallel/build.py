"""Build a model as every entry point does: meta -> parallelize -> allocate -> initialise.

Lives in `braid.parallel` (not `braid.train`) so that `braid.checkpoint`, which loads models,
and `braid.train`, which checkpoints them, both import it without importing each other.
"""

from __future__ import annotations

import torch

from braid.config import Config
from braid.model.init import init_weights
from braid.model.transformer import Transformer
from braid.parallel.mesh import ParallelContext
from braid.parallel.parallelize import parallelize


def build_model(cfg: Config, ctx: ParallelContext, init: bool = True) -> Transformer:
    # 1. structure on the meta device: no memory, no init work;
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.moe)
    # 2. shard and wrap while still on meta, so no rank ever holds the full model;
    parallelize(model, cfg, ctx)
    # 3. allocate this rank's shards on the device;
    model.to_empty(device=ctx.device)
    model.reset_buffers()
    # 4. initialise weights, identical for any layout (or leave them for a checkpoint load).
    if init:
        assign = None
        if ctx.distributed:
            from braid.parallel.data import assign_full

            assign = assign_full
        kwargs = {"assign": assign} if assign else {}
        init_weights(model, cfg.train.seed, cfg.model.init_std, cfg.model.n_layers, **kwargs)
    return model
