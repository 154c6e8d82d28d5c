"""A checkpoint's meta.json: what it holds, under which config, and proof that it is complete.

Written last by rank 0 (after every rank's files are on disk), so its presence marks a complete
checkpoint. Fields:
  format        FORMAT, bumped when the layout changes
  step          optimizer steps done
  world, ep     the layout that wrote it (any layout can read it back)
  fingerprint   Config.fingerprint() of `config`, the resolved config as a dict
  train_state   the trainer's TrainState (step, skipped_steps, tokens_seen, ...)
  optim_groups  the optimizer's param_groups (hyper-parameters, parameter names), or None when
                the optimizer had no state yet (no step applied)
  files         {file name: size in bytes} of every other file, to detect truncation
  torch         the torch version that wrote it
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from braid.checkpoint.paths import META_FILE
from braid.checkpoint.state import read_json
from braid.config import Config, config_from_data
from braid.errors import BraidError

FORMAT = "braid-checkpoint/1"
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": str, "step": int, "world": int, "ep": int, "fingerprint": str, "config": dict,
    "train_state": dict, "optim_groups": (list, type(None)), "files": dict,
}


def build_meta(*, step: int, world: int, ep: int, cfg: Config, train_state: Any,
               optim_groups: list | None, files: dict[str, int]) -> dict:
    return {
        "format": FORMAT, "step": step, "world": world, "ep": ep,
        "fingerprint": cfg.fingerprint(), "config": cfg.to_dict(),
        "train_state": dataclasses.asdict(train_state), "optim_groups": optim_groups,
        "files": files, "torch": torch.__version__,
    }


def file_sizes(ckpt: Path) -> dict[str, int]:
    """{name: bytes} of every file in a checkpoint directory except meta.json and temporaries."""
    return {p.name: p.stat().st_size for p in sorted(Path(ckpt).iterdir())
            if p.is_file() and p.name != META_FILE and ".tmp-" not in p.name}


def read_meta(ckpt: Path) -> dict:
    """meta.json of a checkpoint, checked for shape and for the sizes of the files it lists."""
    ckpt = Path(ckpt)
    meta = read_json(ckpt / META_FILE, "checkpoint metadata")
    if not isinstance(meta, dict):
        raise BraidError(f"checkpoint metadata {ckpt / META_FILE} is not a JSON object: the "
                         "file was altered; resume from another checkpoint")
    for key, tp in _FIELDS.items():
        if not isinstance(meta.get(key), tp):
            raise BraidError(f"checkpoint metadata {ckpt / META_FILE} has a bad or missing "
                             f"{key!r}: the file was altered; resume from another checkpoint")
    if meta["format"] != FORMAT:
        raise BraidError(f"checkpoint {ckpt} has format {meta['format']!r}; this braid reads "
                         f"{FORMAT!r}: use the braid version that wrote it")
    for name, size in meta["files"].items():
        f = ckpt / name
        if not f.is_file():
            raise BraidError(f"checkpoint file {f} is missing: the checkpoint is damaged; "
                             "resume from another one")
        if f.stat().st_size != size:
            raise BraidError(f"checkpoint file {f} has {f.stat().st_size} bytes, expected "
                             f"{size}: it is truncated or altered; resume from another one")
    return meta


def config_of(meta: dict, where: Path) -> Config:
    """The Config a checkpoint was written with (for inference and export)."""
    return config_from_data(meta["config"], meta["fingerprint"], f"checkpoint {where}")
