"""Build the model and the data for a run (used by the trainer, `braid generate` and tests)."""

from __future__ import annotations

import sys
from pathlib import Path

from braid.config import Config
from braid.errors import BraidError
from braid.parallel.build import build_model as build_model  # re-exported (moved there)
from braid.parallel.mesh import ParallelContext


def data_root(cfg: Config) -> Path:
    return Path(cfg.run.dir) / "data"


def load_data(cfg: Config, ctx: ParallelContext):
    """(train dataset, val dataset, train loader, fixed val batches) for this rank."""
    from braid.data import shards
    from braid.data.corpus import ensure_default_corpus
    from braid.data.shards import BatchLoader, TokenDataset, val_batches

    path = cfg.data.path
    if not path:
        why = None
        if ctx.is_main:  # one rank prepares the corpus; the others learn its path or its error
            try:
                path = str(
                    ensure_default_corpus(
                        data_root(cfg),
                        vocab_size=cfg.model.vocab_size,
                        tokenizer=cfg.data.tokenizer,
                        val_fraction=cfg.data.val_fraction,
                        progress=cfg.train.progress,
                    )
                )
            except BraidError as e:
                why = e
        from braid.parallel.distributed import broadcast_object, raise_on_any

        raise_on_any(why, ctx)  # on every rank alike, so none waits in a collective
        if ctx.distributed:
            path = broadcast_object(path, ctx)
    verify = {"auto": None, "all": True, "sizes": False}[cfg.data.verify]
    train_ds = TokenDataset(path, "train", vocab_size=cfg.model.vocab_size, verify=verify)
    val_ds = TokenDataset(path, "val", vocab_size=cfg.model.vocab_size, verify=verify)
    unchecked = [ds.split for ds in (train_ds, val_ds) if not ds.verified]
    if ctx.is_main and cfg.data.verify == "auto" and unchecked:
        limit = shards.AUTO_VERIFY_BYTES >> 20
        print(
            f"data: split(s) {', '.join(unchecked)} over {limit} MiB: sizes checked, sha256 not "
            "(data.verify=all checks them)",
            file=sys.stderr,
            flush=True,
        )
    tc = cfg.train
    loader = BatchLoader(
        train_ds,
        seq_len=tc.seq_len,
        batch_size=tc.batch_size // tc.grad_accum,
        rank=ctx.rank,
        world_size=ctx.world,
        seed=tc.seed,
    )
    vb = val_batches(
        val_ds,
        seq_len=tc.seq_len,
        batch_size=tc.batch_size // tc.grad_accum,
        num_batches=tc.val_batches,
        rank=ctx.rank,
        world_size=ctx.world,
    )
    return train_ds, val_ds, loader, vb
