"""The on-disk format of a prepared dataset: `manifest.json` plus `.npy` token shards.

Contract: `read_manifest` returns a manifest dict whose required keys are present and typed, or
raises a one-line DataError; `open_shard` returns a read-only memory map of one shard after
checking that it exists, has the size, dtype and length the manifest records and, when asked,
the recorded sha256. A truncated or corrupt shard is a DataError, never a numpy traceback.

Layout of a dataset directory (FORMAT "braid-tokens", VERSION 1):

    manifest.json     {"format", "version", "dtype", "max_token_id", "documents",
                       "val_fraction", "tokenizer": {"file", "vocab_size", "eot_id", "sha256"},
                       "splits": {"train"|"val": {"tokens", "max_token_id",
                                  "shards": [{"file", "tokens", "bytes", "sha256"}]}},
                       "sources": [{"path", "documents", "tokens"}], "extra": {...}}
    tokenizer.json    the tokenizer that produced the ids
    train_000000.npy  1-D uint16 (ids < 65536) or uint32 arrays; documents end with eot_id
    val_000000.npy
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from braid.checkpoint.paths import is_plain_name
from braid.errors import DataError

FORMAT = "braid-tokens"
VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
SPLITS = ("train", "val")


def brief(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, for embedding in a one-line DataError."""
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:limit]


def dtype_for(id_bound: int) -> str:
    """The narrowest shard dtype that holds every id below `id_bound`."""
    return "uint16" if id_bound <= 2**16 else "uint32"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_dataset_dir(path: str | Path) -> bool:
    """True when `path` holds a manifest.json written by braid prep (complete or not)."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _need(cond: bool, where: Path, what: str) -> None:
    if not cond:
        raise DataError(f"manifest {str(where)!r} is corrupt ({what}): re-run braid prep")


def read_manifest(path: str | Path) -> dict:
    """The validated manifest of the dataset directory `path`."""
    d = Path(path)
    if not d.is_dir():
        raise DataError(
            f"data path {str(d)!r} is not a directory: run braid prep, or set data.path to "
            "a prepared dataset (empty uses the built-in corpus)"
        )
    mp = d / MANIFEST
    if not mp.is_file():
        raise DataError(
            f"{str(d)!r} has no {MANIFEST}: it is not a prepared dataset (run braid prep on it)"
        )
    try:
        man = json.loads(mp.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(
            f"manifest {str(mp)!r} is not valid JSON ({brief(e)}): re-run braid prep"
        ) from None
    _need(isinstance(man, dict), mp, "not a JSON object")
    _need(man.get("format") == FORMAT, mp, f"format is not {FORMAT!r}")
    version = man.get("version")
    _need(isinstance(version, int), mp, "no integer 'version'")
    if version > VERSION:
        raise DataError(
            f"manifest {str(mp)!r} has format version {version}, newer than this braid reads "
            f"({VERSION}): upgrade braid or re-run braid prep"
        )
    _need(man.get("dtype") in ("uint16", "uint32"), mp, "'dtype' is not uint16/uint32")
    _need(isinstance(man.get("max_token_id"), int), mp, "no integer 'max_token_id'")
    tok = man.get("tokenizer")
    _need(isinstance(tok, dict) and isinstance(tok.get("file"), str), mp, "no 'tokenizer.file'")
    _need(isinstance(tok.get("eot_id"), int), mp, "no integer 'tokenizer.eot_id'")
    _need(isinstance(tok.get("sha256"), str), mp, "no 'tokenizer.sha256'")
    # Like the shards' names, a plain file name: the tokenizer is copied into runs and exports.
    _need(is_plain_name(tok["file"]), mp, f"tokenizer name {tok['file']!r}")
    splits = man.get("splits")
    _need(isinstance(splits, dict), mp, "no 'splits' object")
    for name, split in splits.items():
        _need(isinstance(split, dict), mp, f"split {name!r} is not an object")
        _need(isinstance(split.get("tokens"), int), mp, f"split {name!r} has no integer 'tokens'")
        _need(isinstance(split.get("max_token_id"), int), mp, f"split {name!r}: no max_token_id")
        shards = split.get("shards")
        _need(isinstance(shards, list), mp, f"split {name!r} has no 'shards' list")
        for sh in shards:
            ok = isinstance(sh, dict) and isinstance(sh.get("file"), str)
            ok = ok and all(isinstance(sh.get(k), int) for k in ("tokens", "bytes"))
            ok = ok and isinstance(sh.get("sha256"), str)
            _need(ok, mp, f"a shard of split {name!r} lacks file/tokens/bytes/sha256")
            # Shard names are plain file names: a manifest must not point outside its directory.
            _need(is_plain_name(sh["file"]), mp, f"shard name {sh['file']!r}")
        _need(
            sum(sh["tokens"] for sh in shards) == split["tokens"],
            mp,
            f"split {name!r} token count differs from the sum over its shards",
        )
    return man


def open_shard(root: Path, shard: dict, dtype: str, verify: bool) -> np.ndarray:
    """Memory-map one shard after checking it against its manifest entry."""
    p = root / shard["file"]
    if not p.is_file():
        raise DataError(f"shard {str(p)!r} is missing: re-run braid prep for {str(root)!r}")
    size = os.path.getsize(p)
    if size != shard["bytes"]:
        raise DataError(
            f"shard {str(p)!r} has {size} bytes, the manifest says {shard['bytes']} "
            "(truncated or replaced): re-run braid prep"
        )
    if verify and sha256_file(p) != shard["sha256"]:
        raise DataError(f"shard {str(p)!r} fails its sha256 check (corrupt): re-run braid prep")
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(
            f"shard {str(p)!r} is not a readable .npy file ({brief(e)}): re-run braid prep"
        ) from None
    if arr.ndim != 1 or arr.dtype != np.dtype(dtype) or arr.shape[0] != shard["tokens"]:
        raise DataError(
            f"shard {str(p)!r} holds {arr.dtype}{list(arr.shape)}, the manifest says "
            f"{dtype}[{shard['tokens']}]: re-run braid prep"
        )
    return arr


def check_complete(path: str | Path) -> dict:
    """The manifest, after checking every shard and the tokenizer exist with the right sizes."""
    root = Path(path)
    man = read_manifest(root)
    for split in man["splits"].values():
        for sh in split["shards"]:
            open_shard(root, sh, man["dtype"], verify=False)
    if not (root / man["tokenizer"]["file"]).is_file():
        raise DataError(f"{str(root)!r} lacks its tokenizer file: re-run braid prep")
    return man


def tokenizer_file(root: Path, man: dict) -> Path:
    """The dataset's tokenizer, after checking it against the manifest's sha256 (it is small,
    and it is copied into every run and export made from the dataset)."""
    p = root / man["tokenizer"]["file"]
    if not p.is_file():
        raise DataError(f"{str(root)!r} lacks its tokenizer {p.name}: re-run braid prep")
    if sha256_file(p) != man["tokenizer"]["sha256"]:
        raise DataError(f"tokenizer {str(p)!r} fails its sha256 check: re-run braid prep")
    return p
