"""Where checkpoints live, which ones are complete, which one to resume, which ones to delete.

Layout under a run directory:
  checkpoints/step_XXXXXXXX/        a complete checkpoint (renamed into place when done)
  checkpoints/.tmp-step_XXXXXXXX/   one being written (left behind only by a crash)
  checkpoints/.old-step_XXXXXXXX/   one being replaced by a new save of the same step
  checkpoints/.corrupt-step_XXXXXXXX/  one found damaged at resume, set aside for inspection
A directory is complete when it is named step_XXXXXXXX and holds meta.json (written last).
Only rank 0 changes this tree (rename, prune, clean-up); every rank reads it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from braid.errors import BraidError

CKPT_DIR = "checkpoints"
CORRUPT_PREFIX = ".corrupt-"
META_FILE = "meta.json"  # written last into a checkpoint: its presence marks completeness
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def tmp_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f".tmp-{step_name(step)}"


def final_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / step_name(step)


def is_plain_name(name: object) -> bool:
    """A file name a file read from disk may give for another file beside it: one path
    component, never `.`/`..`, absolute, empty or with a separator or NUL, so it stays inside
    that file's directory (checkpoint metadata, dataset manifests, HF shard indexes)."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in "/\\\0")
        and Path(name).name == name
    )


def is_checkpoint(path: Path) -> bool:
    return _STEP_DIR.match(Path(path).name) is not None and (Path(path) / META_FILE).is_file()


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint of a run, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / META_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def restore_replaced(run_dir: Path) -> list[Path]:
    """Put back each checkpoint that a new save of the same step moved aside (`.old-step_X`)
    where the process died before the new one took its place: without `step_X` the old one is
    that step's only complete copy. The restored directories."""
    root = Path(run_dir) / CKPT_DIR
    back = []
    for old in sorted(root.glob(".old-step_*")) if root.is_dir() else []:
        final = root / old.name.removeprefix(".old-")
        if _STEP_DIR.match(final.name) and not final.exists() and (old / META_FILE).is_file():
            os.replace(old, final)
            back.append(final)
    return back


def resolve_resume(spec: str, run_dir: Path) -> Path | None:
    """The checkpoint that `checkpoint.resume=spec` names for this run, or None (start fresh).

    auto: the newest complete checkpoint in this run's directory, if any; none: no checkpoint;
    anything else: a checkpoint directory, or a run directory (its newest checkpoint).
    """
    if spec == "none":
        return None
    if spec == "auto":
        return latest(run_dir)
    path = Path(spec).expanduser()
    if is_checkpoint(path):
        return path
    if _STEP_DIR.match(path.name) and path.is_dir():
        raise BraidError(
            f"checkpoint.resume={spec!r} is an incomplete checkpoint (no {META_FILE}):"
            " resume from an older step_* directory"
        )
    if (path / CKPT_DIR).is_dir():
        newest = latest(path)
        if newest is None:
            raise BraidError(
                f"checkpoint.resume={spec!r}: that run has no complete checkpoint; "
                "use checkpoint.resume=none to start fresh"
            )
        return newest
    if not path.exists():
        raise BraidError(
            f"checkpoint.resume={spec!r} does not exist: give auto, none, a run "
            "directory or a checkpoints/step_XXXXXXXX directory"
        )
    raise BraidError(
        f"checkpoint.resume={spec!r} is neither a run directory nor a checkpoint "
        "directory: give auto, none, or a path to one of those"
    )


def run_of(ckpt: Path) -> Path:
    """The run directory a checkpoint belongs to (<run>/checkpoints/step_X)."""
    return Path(ckpt).parent.parent


def tokenizer_of(ckpt: Path) -> Path:
    """The tokenizer.json of the run a checkpoint belongs to."""
    return run_of(ckpt) / "tokenizer.json"


def to_delete(steps: list[int], keep_last: int, keep_every: int) -> list[int]:
    """The steps outside the newest `keep_last` and not multiples of `keep_every` (if > 0)."""
    keep = set(sorted(steps)[-keep_last:])
    if keep_every > 0:
        keep |= {s for s in steps if s % keep_every == 0}
    return sorted(s for s in steps if s not in keep)


def prune(run_dir: Path, keep_last: int, keep_every: int) -> list[Path]:
    """Delete complete checkpoints the keep policy drops, and leftovers of crashed saves."""
    found = dict(complete_checkpoints(run_dir))
    removed = [found[s] for s in to_delete(list(found), keep_last, keep_every)]
    root = Path(run_dir) / CKPT_DIR
    removed += [p for p in root.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed
