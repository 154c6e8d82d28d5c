"""Safetensors files of an HF checkpoint, read as data; a streaming single-file writer.

Reading (`HFCheckpoint`): config.json is parsed as JSON; weights come from `model.safetensors`
or the shards that `model.safetensors.index.json` names. Shard names must be plain file names
inside the checkpoint directory (no `..`, no absolute path, no directory part), so an index
cannot point outside it; pickled weights (`*.bin`, `*.pt`) are never opened. Headers are read
once for shapes and dtypes; tensors are read a few at a time with `safe_open`, each shard closed
right after, so the checkpoint is never in memory at once.

Writing (`write_streaming`): the safetensors layout (8-byte little-endian header size, a JSON
header, then the raw tensors back to back) written from a list of (name, shape, dtype) and a
function that makes one tensor at a time, so a converted model never has to be in memory whole.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from braid.checkpoint.paths import is_plain_name
from braid.hf.base import HFRefusal

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int64: "I64",
    torch.int32: "I32",
}


def read_json(path: Path, what: str) -> dict:
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        raise HFRefusal(f"{path} is missing: {what}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise HFRefusal(f"{path} is not valid JSON ({type(e).__name__})") from None
    if not isinstance(body, dict):
        raise HFRefusal(f"{path} is not a JSON object")
    return body


def safe_shard_name(root: Path, name: object) -> Path:
    """The shard file `name` inside `root`; refuses anything that could leave it."""
    if not is_plain_name(name):
        raise HFRefusal(
            f"{root / INDEX} names shard {name!r}: shard names must be plain file "
            "names inside the checkpoint directory"
        )
    if not name.endswith(".safetensors"):
        raise HFRefusal(
            f"{root / INDEX} names shard {name!r}: braid reads only .safetensors "
            "weights (pickled weights can run code)"
        )
    path = root / name
    if not path.is_file():
        raise HFRefusal(f"{path} is missing: {INDEX} names it")
    return path


class HFCheckpoint:
    """The tensors of an HF checkpoint directory: names, shapes, dtypes, and reads by name."""

    def __init__(self, root: Path):
        from safetensors import safe_open

        self.root = Path(root)
        if (self.root / INDEX).is_file():
            weight_map = read_json(self.root / INDEX, "").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise HFRefusal(f"{self.root / INDEX} has no weight_map")
            self.where = {k: safe_shard_name(self.root, v) for k, v in weight_map.items()}
        elif (self.root / SINGLE).is_file():
            self.where = None
        else:
            pickled = sorted(p.name for p in self.root.glob("*.bin"))
            hint = f" ({pickled[0]} is pickled and never read)" if pickled else ""
            raise HFRefusal(
                f"{self.root} has no {SINGLE} or {INDEX}{hint}: braid imports "
                "safetensors checkpoints"
            )
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, str] = {}
        shards = sorted(set(self.where.values())) if self.where else [self.root / SINGLE]
        found: dict[str, Path] = {}
        for path in shards:
            try:
                with safe_open(path, "pt") as f:
                    for k in f.keys():
                        s = f.get_slice(k)
                        self.shape[k], self.dtype[k] = tuple(s.get_shape()), s.get_dtype()
                        found[k] = path
            except Exception as e:  # the Rust side raises plain exceptions on a bad file
                raise HFRefusal(
                    f"{path} is not a readable safetensors file "
                    f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})"
                ) from None
        if self.where:
            for k, path in self.where.items():
                if found.get(k) != path:
                    raise HFRefusal(
                        f"{self.root / INDEX} puts {k} in {path.name}, which does not hold it"
                    )
        self.where = found

    def read(self, keys: list[str]) -> list[Tensor]:
        """The tensors `keys`, each shard opened once; the tensors map the file lazily."""
        from safetensors import safe_open

        out: dict[str, Tensor] = {}
        by_shard: dict[Path, list[str]] = {}
        for k in keys:
            by_shard.setdefault(self.where[k], []).append(k)
        for path, names in by_shard.items():
            with safe_open(path, "pt") as f:
                for k in names:
                    # A view of the file mapping (it outlives the handle): the transform's copy
                    # is the read, and the pages go when the tensor does.
                    out[k] = f.get_tensor(k)
        return [out[k] for k in keys]


def write_streaming(
    path: Path,
    entries: list[tuple[str, tuple[int, ...], torch.dtype]],
    make: Callable[[int], Tensor],
    metadata: dict[str, str],
) -> None:
    """Write a safetensors file whose i-th tensor is `make(i)` (shape/dtype as `entries[i]`),
    with a progress bar in bytes on a terminal (a large model takes minutes)."""
    from tqdm import tqdm

    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, shape, dtype in entries:
        n = dtype.itemsize
        for s in shape:
            n *= s
        header[name] = {
            "dtype": DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    # disable=None: drawn only when stderr is a terminal (no carriage returns in a log file)
    bar = tqdm(total=offset, unit="B", unit_scale=True, desc=path.name, disable=None, leave=False)
    with open(path, "wb") as f, bar:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for i, (name, shape, dtype) in enumerate(entries):
            t = make(i)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise AssertionError(
                    f"{name}: made {tuple(t.shape)} {t.dtype}, planned {shape} {dtype}"
                )
            data = t.contiguous().reshape(-1).view(torch.uint8).numpy().data
            f.write(data)
            bar.update(len(data))
        f.flush()
        os.fsync(f.fileno())
