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
  hashes        {file name: blake2b-128 hex} of every other file (braid.checkpoint.integrity),
                checked before the files are used; format 1 checkpoints have none
  torch         the torch version that wrote it
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from braid.checkpoint.integrity import DamagedFile, my_part, verify_files
from braid.checkpoint.paths import META_FILE, is_plain_name
from braid.checkpoint.state import read_json
from braid.config import Config, config_from_data, fingerprint_of
from braid.errors import BraidError

FORMAT = "braid-checkpoint/2"
_READABLE = (FORMAT, "braid-checkpoint/1")  # 1: the same, without content hashes
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "step": int,
    "world": int,
    "ep": int,
    "fingerprint": str,
    "config": dict,
    "train_state": dict,
    "optim_groups": (list, type(None)),
    "files": dict,
}


def build_meta(
    *,
    step: int,
    world: int,
    ep: int,
    cfg: Config,
    train_state: Any,
    optim_groups: list | None,
    files: dict[str, int],
    hashes: dict[str, str],
) -> dict:
    return {
        "format": FORMAT,
        "step": step,
        "world": world,
        "ep": ep,
        "fingerprint": cfg.fingerprint(),
        "config": cfg.to_dict(),
        "train_state": dataclasses.asdict(train_state),
        "optim_groups": optim_groups,
        "files": files,
        "hashes": hashes,
        "torch": torch.__version__,
    }


def file_sizes(ckpt: Path) -> dict[str, int]:
    """{name: bytes} of every file in a checkpoint directory except meta.json and temporaries."""
    return {
        p.name: p.stat().st_size
        for p in sorted(Path(ckpt).iterdir())
        if p.is_file() and p.name != META_FILE and ".tmp-" not in p.name
    }


def read_meta(ckpt: Path) -> dict:
    """meta.json of a checkpoint, checked for shape and for the sizes of the files it lists."""
    ckpt = Path(ckpt)
    try:
        meta = read_json(ckpt / META_FILE, "checkpoint metadata")
    except BraidError as e:
        raise DamagedFile(str(e)) from None
    if not isinstance(meta, dict):
        raise DamagedFile(
            f"checkpoint metadata {ckpt / META_FILE} is not a JSON object: the "
            "file was altered; resume from another checkpoint"
        )
    for key, tp in _FIELDS.items():
        if not isinstance(meta.get(key), tp):
            raise DamagedFile(
                f"checkpoint metadata {ckpt / META_FILE} has a bad or missing "
                f"{key!r}: the file was altered; resume from another checkpoint"
            )
    if meta["format"] not in _READABLE:
        raise BraidError(
            f"checkpoint {ckpt} has format {meta['format']!r}; this braid reads "
            f"{' and '.join(_READABLE)}: use the braid version that wrote it"
        )
    if meta["fingerprint"] != fingerprint_of(meta["config"]):
        raise DamagedFile(
            f"checkpoint metadata {ckpt / META_FILE}: the config does not match "
            "its fingerprint: the file was altered; resume from another checkpoint"
        )
    hashes = meta.get("hashes", {})
    if meta["format"] == FORMAT and (
        not isinstance(hashes, dict) or set(hashes) != set(meta["files"])
    ):
        raise DamagedFile(
            f"checkpoint metadata {ckpt / META_FILE} has bad or missing "
            "'hashes': the file was altered; resume from another checkpoint"
        )
    listed = list(meta["files"]) + (list(hashes) if isinstance(hashes, dict) else [])
    for name in listed:
        if not is_plain_name(name):  # the checkpoint's own files only
            raise DamagedFile(
                f"checkpoint metadata {ckpt / META_FILE} lists {name!r}, outside the "
                "checkpoint: the file was altered; resume from another checkpoint"
            )
    for name, size in meta["files"].items():
        f = ckpt / name
        if not f.is_file():
            raise DamagedFile(
                f"checkpoint file {f} is missing: the checkpoint is damaged; "
                "resume from another one"
            )
        if f.stat().st_size != size:
            raise DamagedFile(
                f"checkpoint file {f} has {f.stat().st_size} bytes, expected "
                f"{size}: it is truncated or altered; resume from another one"
            )
    return meta


def verify_checkpoint(ckpt: Path, meta: dict, rank: int = 0, world: int = 1) -> None:
    """Check this rank's share of the checkpoint's files against their content hashes (all of
    them in one process); DamagedFile names the first that differs. Format 1 has no hashes."""
    hashes = meta.get("hashes")
    if not hashes:
        return
    verify_files(
        ckpt, hashes, my_part(hashes, rank, world), "checkpoint", "resume from another checkpoint"
    )


def config_of(meta: dict, where: Path) -> Config:
    """The Config a checkpoint was written with (for inference and export)."""
    return config_from_data(meta["config"], meta["fingerprint"], f"checkpoint {where}")
