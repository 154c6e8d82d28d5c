"""`braid prep`: turn text into a prepared dataset (token shards, tokenizer, manifest).

Contract: `prepare(...)` either leaves a complete dataset in `out_dir` (layout and manifest in
`braid.data.manifest`) and returns its manifest, or raises and leaves `out_dir` as it was. All
output is written into a hidden temporary directory next to `out_dir` and renamed into place
when complete; the temporary directory is removed on any failure (Ctrl-C included).

Rules:
- Every document is followed by the tokenizer's end-of-text id. A text file is one document;
  each .jsonl line / parquet row / HF row is one document. Empty documents are skipped.
- Validation split: the last `val_fraction` of the tokens of the whole stream, in input order
  (files sorted within each directory), goes to `val`; the rest to `train`. With several files
  this holds out whole trailing documents (no text of them is trained on), and val gets at
  least one token whenever val_fraction > 0. It is deterministic: same inputs, same split.
- Without `tokenizer`, a byte-level BPE of `vocab_size` is trained on the first
  `BPE_TRAIN_CHARS` characters of the stream (all of it for corpora below that size).
- Progress bars (`progress=True`) are drawn on stderr only when it is a terminal.
- `out_dir` may be missing, empty, or a previous braid dataset, which is replaced (the old one
  is renamed aside, the new one renamed in, then the old one deleted). Any other non-empty
  directory is refused, so a typo cannot delete someone's files.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from braid.data.manifest import (
    FORMAT,
    MANIFEST,
    TOKENIZER,
    VERSION,
    dtype_for,
    is_dataset_dir,
    sha256_file,
)
from braid.data.sources import Source, expand_inputs, file_source, hf_source
from braid.data.tokenizer import Tok, train_bpe
from braid.errors import DataError

# BPE training costs ~0.5 s per MB on 2 cores; 100M characters is plenty for a 2k-64k vocab.
BPE_TRAIN_CHARS = 100_000_000
BATCH_CHARS = 8 << 20  # text per encode_batch call: big enough to keep every core busy


def prepare(
    inputs: list[str | Path],
    out_dir: str | Path,
    *,
    tokenizer: str | None = None,
    vocab_size: int = 2048,
    val_fraction: float = 0.05,
    shard_tokens: int = 2**24,
    hf_dataset: str | None = None,
    hf_split: str = "train",
    text_field: str = "text",
    progress: bool = True,
) -> dict:
    """Tokenize `inputs` (files/directories) and/or a cached HF dataset into `out_dir`."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    out = Path(out_dir).expanduser().resolve()
    check_target(out)
    files = [f for f in expand_inputs(inputs or []) if out not in f.parents]
    sources = [file_source(f, text_field) for f in files]
    if hf_dataset:
        sources.append(hf_source(hf_dataset, hf_split, text_field))
    if not sources:
        raise DataError("no inputs: pass text/.jsonl/.parquet files or directories, or hf_dataset")
    return build(
        sources,
        out,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        val_fraction=val_fraction,
        shard_tokens=shard_tokens,
        progress=progress,
    )


def build(
    sources: list[Source],
    out_dir: str | Path,
    *,
    tokenizer: str | Path | None,
    vocab_size: int,
    val_fraction: float,
    shard_tokens: int,
    progress: bool,
    extra: dict | None = None,
) -> dict:
    """Write the dataset of `sources` to `out_dir` atomically; `extra` goes into the manifest."""
    if not (isinstance(val_fraction, (int, float)) and 0 <= val_fraction < 1):
        raise DataError(f"val_fraction={val_fraction!r}: must be in [0, 1), e.g. 0.05")
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise DataError(f"shard_tokens={shard_tokens!r}: must be a positive integer, e.g. 2**24")
    out = Path(out_dir).expanduser().resolve()
    check_target(out)
    # Load a given tokenizer before any slow work, so a bad path fails at once.
    tok = Tok.from_file(tokenizer) if tokenizer else None
    with atomic_dir(out) as tmp:
        if tok is None:
            tok = Tok(train_bpe(_training_text(sources, progress), vocab_size))
        dtype = dtype_for(tok.vocab_size)
        flat = tmp / "tokens.tmp"
        stats = _tokenize(sources, tok, flat, dtype, progress)
        if stats["content_tokens"] == 0:
            names = ", ".join(s.name for s in sources[:3]) + (" ..." if len(sources) > 3 else "")
            raise DataError(f"no text found in the inputs ({names}): pass non-empty files")
        splits = _write_splits(flat, tmp, dtype, stats["tokens"], val_fraction, shard_tokens)
        flat.unlink()
        if tokenizer:  # keep the user's file byte for byte
            shutil.copyfile(tokenizer, tmp / TOKENIZER)
        else:
            tok.save(tmp / TOKENIZER)
        man = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": dtype,
            "max_token_id": max(s["max_token_id"] for s in splits.values()),
            "documents": stats["documents"],
            "val_fraction": val_fraction,
            "tokenizer": {
                "file": TOKENIZER,
                "vocab_size": tok.vocab_size,
                "eot_id": tok.eot_id,
                "sha256": sha256_file(tmp / TOKENIZER),
            },
            "splits": splits,
            "sources": stats["sources"],
            "extra": extra or {},
        }
        # The manifest is written last: a directory with a manifest is a finished one.
        (tmp / MANIFEST).write_text(json.dumps(man, indent=2) + "\n", encoding="utf-8")
    return man


def check_target(out: Path) -> None:
    """Refuse an output path that is a file or a non-empty directory braid did not write."""
    if out.exists() and not out.is_dir():
        raise DataError(f"out_dir {str(out)!r} is a file: pass a directory path")
    if out.is_dir() and any(out.iterdir()) and not is_dataset_dir(out):
        raise DataError(
            f"out_dir {str(out)!r} is not empty and is not a braid dataset: pick a new or empty "
            "directory (braid only replaces its own output)"
        )


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """A fresh directory next to `out` that becomes `out` if the block finishes without error."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; a dataset is meant to be shared
        _sync_files(tmp)  # on disk before the rename makes them a finished dataset
        _install(tmp, out)
        _sync_files(out.parent, files=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left there after a successful install


def _sync_files(d: Path, files: bool = True) -> None:
    """fsync the files directly in `d` (with `files`) and `d` itself, where the OS allows."""
    from braid.checkpoint.state import fsync_dir

    for p in sorted(d.iterdir()) if files else []:
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(d)


def _install(tmp: Path, out: Path) -> None:
    # rename() replaces a missing or empty directory atomically. A previous dataset is moved
    # aside first; the loop absorbs another process doing the same thing at the same moment.
    for _ in range(20):
        try:
            os.replace(tmp, out)
            return
        except OSError:
            check_target(out)
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            try:
                os.replace(out, old / "data")
            except FileNotFoundError:
                pass
            finally:
                shutil.rmtree(old, ignore_errors=True)
    raise DataError(f"could not replace {str(out)!r}: another process keeps writing it")


def _bar(progress: bool, total: int | None, desc: str) -> tqdm:
    # disable=None: drawn only when stderr is a terminal. On a pipe or in a log file the bar's
    # carriage returns would run into the one-line messages there.
    disable = None if progress else True
    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc=desc,
        disable=disable,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
    )


def _total_bytes(sources: list[Source]) -> int | None:
    sizes = [s.nbytes for s in sources]
    return None if None in sizes else sum(sizes)


def _training_text(sources: list[Source], progress: bool) -> Iterator[str]:
    budget = BPE_TRAIN_CHARS
    with _bar(progress, _total_bytes(sources), "train BPE") as bar:
        for src in sources:
            for piece, nbytes, _ in src.pieces():
                yield piece[:budget]
                bar.update(nbytes)
                budget -= len(piece)
                if budget <= 0:
                    return


def _tokenize(sources: list[Source], tok: Tok, flat: Path, dtype: str, progress: bool) -> dict:
    """Encode every source into `flat` (raw `dtype` ids, EOT after each document)."""
    per_src = [{"path": s.name, "documents": 0, "tokens": 0} for s in sources]
    stats = {"tokens": 0, "content_tokens": 0, "documents": 0, "sources": per_src}
    limit = np.iinfo(dtype).max
    batch: list[tuple[str, bool, int]] = []

    def flush(f) -> None:
        encoded = tok.encode_batch([p for p, _, _ in batch])
        parts: list[list[int]] = []
        for ids, (_, end, si) in zip(encoded, batch, strict=True):
            parts.append(ids)
            stats["content_tokens"] += len(ids)
            n = len(ids)
            if end:
                parts.append([tok.eot_id])
                n += 1
                per_src[si]["documents"] += 1
                stats["documents"] += 1
            per_src[si]["tokens"] += n
        count = sum(map(len, parts))
        arr = np.fromiter(itertools.chain.from_iterable(parts), dtype=np.int64, count=count)
        if count and (arr.max() > limit or arr.min() < 0):
            raise DataError(
                f"the tokenizer produced id {int(arr.max())} outside {dtype}: "
                "its vocab and ids disagree; use another tokenizer.json"
            )
        arr.astype(dtype).tofile(f)
        stats["tokens"] += count
        batch.clear()

    with open(flat, "wb") as f, _bar(progress, _total_bytes(sources), "tokenize") as bar:
        chars = 0
        for si, src in enumerate(sources):
            for piece, nbytes, end in src.pieces():
                batch.append((piece, end, si))
                chars += len(piece)
                bar.update(nbytes)
                if chars >= BATCH_CHARS:
                    flush(f)
                    chars = 0
        flush(f)
    return stats


def _write_splits(
    flat: Path, root: Path, dtype: str, total: int, val_fraction: float, shard_tokens: int
) -> dict:
    """Cut the flat id stream into train/val `.npy` shards; their manifest entries."""
    n_val = 0 if val_fraction == 0 else min(total - 1, max(1, round(total * val_fraction)))
    data = np.memmap(flat, dtype=dtype, mode="r", shape=(total,))
    splits = {}
    for name, (a, b) in {"train": (0, total - n_val), "val": (total - n_val, total)}.items():
        shards, top = [], -1
        for k, s in enumerate(range(a, b, shard_tokens)):
            chunk = np.asarray(data[s : min(b, s + shard_tokens)])
            fname = f"{name}_{k:06d}.npy"
            np.save(root / fname, chunk)
            top = max(top, int(chunk.max()))
            shards.append(
                {
                    "file": fname,
                    "tokens": int(chunk.size),
                    "bytes": os.path.getsize(root / fname),
                    "sha256": sha256_file(root / fname),
                }
            )
        splits[name] = {"tokens": b - a, "max_token_id": top, "shards": shards}
    del data  # release the map before the caller deletes the file
    return splits
