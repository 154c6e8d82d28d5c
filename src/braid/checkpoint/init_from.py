"""`checkpoint.init_from = DIR`: start a new run from the weights of a Braid model directory.

A Braid model directory is what `braid import` and `braid export` write (model.safetensors,
config.json, tokenizer.json). Unlike `checkpoint.resume`, nothing but the weights is taken: the
run starts at step 0 with a fresh optimizer, schedule, data order and records, and a checkpoint
of the run itself, when there is one, wins (the trainer reads init_from only when resume found
nothing, so a restarted fine-tuning run resumes instead of starting over).

Contract:
  * the run's [model] and [moe] must compute what the directory's config computes: every key
    of those sections must match except the training-only ones (TRAINING_ONLY), or the load is
    refused in one line naming the first differing key and the value DIR holds;
  * every persistent tensor of the model must be in the file with its global shape, and the
    file must hold nothing else;
  * each rank reads only what it holds: for a DTensor (FSDP2 / expert-parallel shards) the box
    of the global tensor that `compute_local_shape_and_global_offset` gives it, through
    `safe_open(...).get_slice(name)[box]`, so no rank reads other ranks' experts. No
    communication is needed: every rank reads its own part of the same file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from braid.config import Config
from braid.errors import BraidError

# Knobs that change how a model is trained, never what its weights compute.
TRAINING_ONLY = frozenset(
    {
        "model.init_std",
        "model.max_seq_len",
        "model.mtp_loss_weight",
        "moe.aux_loss_coef",
        "moe.z_loss_coef",
        "moe.bias_update_rate",
        "moe.bias_balance",
        "moe.capacity_factor",
        "moe.expert_impl",
    }
)


def check_same_model(cfg: Config, saved: Config, where: Path) -> None:
    """Refuse a run config whose model differs from the one the weights belong to."""
    for section in ("model", "moe"):
        mine, theirs = getattr(cfg, section).__dict__, getattr(saved, section).__dict__
        for key, value in theirs.items():
            name = f"{section}.{key}"
            if name in TRAINING_ONLY or mine.get(key) == value:
                continue
            if section == "moe" and key in ("layers", "first_k_dense", "every"):
                if cfg.moe.moe_layer_ids(cfg.model.n_layers) == saved.moe.moe_layer_ids(
                    saved.model.n_layers
                ):
                    continue
            raise BraidError(
                f"checkpoint.init_from={str(where)!r} holds a model with "
                f"{name}={value!r} but this run has {mine.get(key)!r}: set "
                f"--{name}={value!r} (or use the [model]/[moe] of "
                f"{where / 'model.toml'} when it has one)"
            )


def check_init(cfg: Config, data_tokenizer: str | Path | None = None, verify: bool = True) -> None:
    """Before anything is written: the directory of `checkpoint.init_from` exists, its files
    match their hashes (`verify`), it holds the model this run builds, and its tokenizer is the
    one the training data was made with."""
    from tokenizers import Tokenizer

    from braid.checkpoint.load import TOKENIZER_FILE, WEIGHTS_FILE, read_export_config

    path = Path(cfg.checkpoint.init_from)
    if not (path / WEIGHTS_FILE).is_file():
        raise BraidError(
            f"checkpoint.init_from={str(path)!r} has no {WEIGHTS_FILE}: give a "
            "directory written by braid import or braid export"
        )
    if _is_hf(path):
        raise BraidError(
            f"checkpoint.init_from={str(path)!r} is a Hugging Face checkpoint: "
            f"convert it first with braid import {path} --out DIR"
        )
    check_same_model(cfg, read_export_config(path, verify=verify), path)
    if data_tokenizer is not None and (path / TOKENIZER_FILE).is_file():
        mine = Tokenizer.from_file(str(data_tokenizer)).to_str()
        if mine != Tokenizer.from_file(str(path / TOKENIZER_FILE)).to_str():
            raise BraidError(
                f"the training data was tokenized with {data_tokenizer}, not with "
                f"{path / TOKENIZER_FILE} of checkpoint.init_from: prepare it with "
                f"braid prep --tokenizer {path / TOKENIZER_FILE}"
            )


def _is_hf(path: Path) -> bool:
    import json

    try:
        return "model_type" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


@torch.no_grad()
def load_init(model: nn.Module, path: str | Path, cfg: Config) -> int:
    """Copy the weights of the Braid model directory `path` into `model` (this rank's parts).
    Returns the number of elements this rank read."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from braid.checkpoint.load import WEIGHTS_FILE

    path = Path(path)
    check_init(cfg.replace(checkpoint={"init_from": str(path)}), verify=False)  # checked early
    targets = model.state_dict(keep_vars=True)
    read = 0
    with safe_open(path / WEIGHTS_FILE, "pt") as f:
        extra = sorted(set(f.keys()) - set(targets))
        if extra:
            raise BraidError(
                f"{path / WEIGHTS_FILE} holds {extra[0]}, which this run's model does not have"
            )
        for name, t in targets.items():
            if name not in f.keys():
                raise BraidError(f"{path / WEIGHTS_FILE} lacks {name}")
            src = f.get_slice(name)
            if tuple(src.get_shape()) != tuple(t.shape):  # a DTensor reports its global shape
                raise BraidError(
                    f"{path / WEIGHTS_FILE}: {name} is {list(src.get_shape())}, "
                    f"the model needs {list(t.shape)}"
                )
            if isinstance(t, DTensor):
                local = t.to_local()
                if local.numel() == 0:
                    continue  # FSDP padding: this rank holds no rows of this tensor
                shape, offset = compute_local_shape_and_global_offset(
                    t.shape, t.device_mesh, t.placements
                )
                part = src[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))]
            else:
                local, part = t.data, src[:]
            local.copy_(part)
            read += part.numel()
    return read
