"""Content hashes of checkpoint and export files: written after the data, checked before use.

A hash is `blake2b-128` over the file's bytes, streamed in 4 MiB blocks (hashlib's BLAKE2 runs
at about 1 GB/s on one core and is in every Python, so no extra dependency). A checkpoint's
meta.json keeps `{file: hash}` for every file in the checkpoint; an export's config.json keeps
the hash of its weights. Work is split over ranks by file (`part=(rank, world)` takes every
world-th file), so a checkpoint is hashed and verified at the speed of all ranks together.

A mismatch raises `DamagedFile` (a BraidError) naming the file; `braid.checkpoint.manager`
then falls back to the newest intact checkpoint when resuming with `checkpoint.resume=auto`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from braid.errors import BraidError

ALGORITHM = "blake2b-128"
_BLOCK = 4 << 20


class DamagedFile(BraidError):
    """A file's bytes are not the ones written: truncated, altered, or missing."""

    def finding(self) -> str:
        """What is wrong, without the advice to resume from another checkpoint that ends the
        message (a caller with better advice adds its own)."""
        text = str(self).removesuffix("; resume from another checkpoint")
        return text.removesuffix("; resume from another one")


def file_hash(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def hash_files(root: Path, names: Iterable[str]) -> dict[str, str]:
    """{name: hash} of the named files under `root`."""
    return {name: file_hash(Path(root) / name) for name in names}


def my_part(names: Iterable[str], rank: int = 0, world: int = 1) -> list[str]:
    """The files this rank hashes or checks: every world-th of the sorted names."""
    return sorted(names)[rank::world]


def verify_files(
    root: Path, hashes: dict[str, str], names: Iterable[str], what: str, fix: str
) -> None:
    """Check the named files under `root` against `hashes`; DamagedFile for the first that
    differs or is missing."""
    for name in names:
        f = Path(root) / name
        if not f.is_file():
            raise DamagedFile(f"{what} file {f} is missing: {fix}")
        if file_hash(f) != hashes[name]:
            raise DamagedFile(
                f"{what} file {f} does not match its {ALGORITHM} checksum: it "
                f"was altered or damaged on disk; {fix}"
            )
