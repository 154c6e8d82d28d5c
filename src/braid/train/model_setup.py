"""Build the model and the data for a run (used by the trainer, `braid generate` and tests)."""

from __future__ import annotations

from pathlib import Path

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


def data_root(cfg: Config) -> Path:
    return Path(cfg.run.dir) / "data"


def load_data(cfg: Config, ctx: ParallelContext):
    """(train dataset, val dataset, train loader, fixed val batches) for this rank."""
    from braid.data.corpus import ensure_default_corpus
    from braid.data.shards import BatchLoader, TokenDataset, val_batches

    path = cfg.data.path
    if not path:
        if ctx.is_main:
            path = str(ensure_default_corpus(
                data_root(cfg), vocab_size=cfg.model.vocab_size, tokenizer=cfg.data.tokenizer,
                val_fraction=cfg.data.val_fraction, progress=cfg.train.progress))
        if ctx.distributed:
            from braid.parallel.distributed import broadcast_object

            path = broadcast_object(path, ctx)
    train_ds = TokenDataset(path, "train", vocab_size=cfg.model.vocab_size)
    val_ds = TokenDataset(path, "val", vocab_size=cfg.model.vocab_size)
    tc = cfg.train
    loader = BatchLoader(train_ds, seq_len=tc.seq_len, batch_size=tc.batch_size // tc.grad_accum,
                         rank=ctx.rank, world_size=ctx.world, seed=tc.seed)
    vb = val_batches(val_ds, seq_len=tc.seq_len, batch_size=tc.batch_size // tc.grad_accum,
                     num_batches=tc.val_batches, rank=ctx.rank, world_size=ctx.world)
    return train_ds, val_ds, loader, vb
