"""Tensor I/O through torch.distributed.checkpoint (DCP), with nothing unpickled beyond tensors.

`save_tensors(tree, path, distributed)` writes a nested dict of tensors (plain or DTensor, any
sharding) with DCP's FileSystemWriter: every rank writes its own shards, the coordinator writes
`.metadata`, files are fsynced. `load_tensors(tree, path, distributed)` fills the tensors of
`tree` in place from `path`, resharding to whatever layout `tree` has (DCP does the slicing).

What DCP 2.13 unpickles, and what we do about it (checked against torch/distributed/checkpoint):
  * `.metadata` is a pickle (`FileSystemReader.read_metadata` calls `pickle.load`). We read it
    with `_RestrictedUnpickler`, which can build only the DCP metadata classes, torch.Size,
    dtypes, layouts and paths, so a crafted file cannot run code; anything else is refused.
  * tensor payloads are read with `torch.load(weights_only=True)` by DCP itself.
  * non-tensor values (BYTE_IO items) would go through `torch.load(weights_only=False)` in
    `DefaultLoadPlanner.load_bytes`. Braid never writes them (non-tensor state is JSON, see
    braid.checkpoint.state), and `_TensorOnlyPlanner` refuses any that a file claims to hold.
So loading a tampered checkpoint fails with a BraidError instead of running code; the residual
trust is the one any tensor file needs (a wrong number loads as a wrong number).
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_md
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter, _StorageInfo

from braid.checkpoint.paths import is_plain_name
from braid.errors import BraidError, first_line

METADATA_FILE = ".metadata"  # DCP's name for the global metadata file

_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch.distributed.checkpoint.metadata", name): getattr(dcp_md, name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
}
_ALLOWED.update(
    {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
        ("torch", "Size"): torch.Size,
        ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
        ("pathlib", "PosixPath"): pathlib.PurePosixPath,  # a pure path: never touches the disk
        ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
        ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,
        ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
    }
)


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds DCP metadata and nothing else (Python docs, pickle: "Restricting Globals")."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def read_metadata(path: Path) -> dcp_md.Metadata:
    """The DCP metadata of the checkpoint at `path`, read without running pickled code."""
    file = Path(path) / METADATA_FILE
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise BraidError(
            f"checkpoint {path} has no {METADATA_FILE}: it is incomplete; resume "
            "from another checkpoint or delete it"
        ) from None
    try:
        md = _RestrictedUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # any malformed pickle: truncated, tampered, foreign
        raise BraidError(
            f"checkpoint file {file} is corrupt or not a braid checkpoint "
            f"({type(e).__name__}: {_one_line(e)}); resume from another checkpoint"
        ) from None
    if not isinstance(md, dcp_md.Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise BraidError(
            f"checkpoint file {file} does not hold DCP metadata; resume from another checkpoint"
        )
    for key, entry in md.state_dict_metadata.items():
        if not isinstance(entry, dcp_md.TensorStorageMetadata):
            raise BraidError(
                f"checkpoint file {file} declares a non-tensor entry {key!r}; "
                "braid never writes those, so the file was altered"
            )
    storage = getattr(md, "storage_data", None)
    if not isinstance(storage, dict):
        raise BraidError(
            f"checkpoint file {file} has no storage map; resume from another checkpoint"
        )
    for info in storage.values():  # every read stays among this checkpoint's own files
        name = getattr(info, "relative_path", None)
        if not is_plain_name(name):
            raise BraidError(
                f"checkpoint file {file} points a tensor at {name!r}, outside the "
                "checkpoint's own files, so the file was altered; resume from another checkpoint"
            )
    return md


class _SafeReader(FileSystemReader):
    """FileSystemReader whose metadata comes from `read_metadata` above (no plain pickle.load)."""

    def __init__(self, path: Path, metadata: dcp_md.Metadata):
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self) -> dcp_md.Metadata:  # no **kwargs: no fallback to rank-local files
        md = self._metadata
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = dcp_md.StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class _TensorOnlyPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value) -> None:
        raise BraidError(
            f"checkpoint entry {read_item.dest_index.fqn!r} is a pickled object; "
            "braid never writes those, so the file was altered"
        )


def save_tensors(tree: dict[str, Any], path: Path, distributed: bool, group: Any = None) -> None:
    """Write the tensors of `tree` into the directory `path` (collective over `group` when
    distributed; None is the default group)."""
    writer = FileSystemWriter(path, single_file_per_rank=True, sync_files=True)
    with _quiet_single_process():
        dcp.save(tree, storage_writer=writer, process_group=group, no_dist=not distributed)


def load_tensors(tree: dict[str, Any], path: Path, distributed: bool, group: Any = None) -> None:
    """Fill the tensors of `tree` in place from the checkpoint at `path` (collective over
    `group` when distributed)."""
    reader = _SafeReader(path, read_metadata(path))
    missing = _missing_keys(tree, reader._metadata)
    if missing:
        raise BraidError(
            f"checkpoint {path} lacks {len(missing)} tensors the model needs (first: "
            f"{missing[0]}); it was written for another model config"
        )
    extra = _extra_model_keys(tree, reader._metadata)
    if extra:  # a smaller model would load silently: its config and the tensors disagree
        raise BraidError(
            f"checkpoint {path} holds {len(extra)} model tensors this model lacks "
            f"(first: {extra[0]}): the model config it was read with is not the "
            "one that wrote it (an altered meta.json?)"
        )
    try:
        with _quiet_single_process():
            dcp.load(
                tree,
                storage_reader=reader,
                planner=_TensorOnlyPlanner(),
                process_group=group,
                no_dist=not distributed,
            )
    except BraidError:
        raise
    except (CheckpointException, Exception) as e:
        raise BraidError(
            f"checkpoint {path} cannot be loaded ({_root_cause(e)}); resume from "
            "another checkpoint or delete this one"
        ) from None


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """Hide DCP's warning that one process means no process group: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def _missing_keys(tree: dict[str, Any], md: dcp_md.Metadata) -> list[str]:
    return sorted(k for k in _flat_keys(tree) if k not in md.state_dict_metadata)


def _extra_model_keys(tree: dict[str, Any], md: dcp_md.Metadata) -> list[str]:
    """Model tensors in the checkpoint that `tree` does not ask for."""
    if "model" not in tree:
        return []
    wanted = set(_flat_keys({"model": tree["model"]}))
    return sorted(k for k in md.state_dict_metadata if k.startswith("model.") and k not in wanted)


def save_error(e: BaseException, path: Path) -> BraidError:
    """A one-line error for a failed tensor save: the root cause and, when the disk is full or
    read-only, where and how much space is left. The checkpoint being written is incomplete and
    ignored; the previous one stays the newest."""
    from braid.errors import describe_os_error

    cause: BaseException | None = e
    failures = getattr(e, "failures", None)
    if failures:
        cause = next(iter(failures.values()))[0]
    seen = set()
    while cause is not None and id(cause) not in seen:  # the OSError under DCP's wrapping
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno is not None:
            return BraidError(
                describe_os_error(cause, path, "write the checkpoint")
                + "; the previous checkpoint is intact"
            )
        cause = cause.__cause__ or cause.__context__
    text = _root_cause(e)
    if "No space left" in text or "file write failed" in text:  # torch's C++ writer says this
        import errno

        return BraidError(
            describe_os_error(
                OSError(errno.ENOSPC, "No space left on device"), path, "write the checkpoint"
            )
            + "; the previous checkpoint is intact"
        )
    return BraidError(
        f"cannot write the checkpoint {path} ({text}); the previous checkpoint is intact"
    )


def _flat_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """DCP's names for the leaves of a nested dict: the keys joined with dots."""
    keys = []
    for k, v in tree.items():
        keys += _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return keys


def _root_cause(e: BaseException) -> str:
    failures = getattr(e, "failures", None)
    if failures:  # CheckpointException: {rank: (exception, traceback)}
        rank, (exc, _) = next(iter(failures.items()))
        if isinstance(exc, BraidError):
            return f"rank {rank}: {exc}"
        return f"rank {rank}: {type(exc).__name__}: {_one_line(exc)}"
    return f"{type(e).__name__}: {_one_line(e)}"


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    if "weights_only" in text or "Weights only load failed" in text:
        # torch's advice (load with weights_only=False) would run code from the file: never
        return "a tensor file holds something other than tensors, which braid refuses to load"
    return first_line(e)
