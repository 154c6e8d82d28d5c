"""Non-tensor checkpoint state as JSON: a lossless tagged codec and atomic, fsynced file writes.

Contract: `encode(obj)` turns nested dicts/lists/tuples of str, int, float, bool, None, numpy
arrays/scalars and small torch tensors into plain JSON values, and `decode(encode(obj))` gives
back an equal object with the same types (tuples stay tuples, arrays keep dtype and shape,
floats keep every bit, NaN and inf included). Nothing is ever unpickled: reading a checkpoint's
JSON can build only these types. `read_json` turns a missing, truncated or tampered file into a
one-line BraidError naming the file.

Tags (a dict with one of these keys is a tagged value): `__tuple__` (list of items),
`__float__` (hex string: exact, and JSON has no NaN/inf), `__ndarray__` ({dtype, shape, data}),
`__tensor__` (same, for a CPU torch tensor), `__dict__` (list of [key, value] pairs, used when
some key is not a string). Python ints are exact in JSON at any size.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from braid.errors import BraidError, first_line

_TAGS = ("__tuple__", "__float__", "__ndarray__", "__tensor__", "__dict__")


def encode(obj: Any) -> Any:
    """A JSON-able form of `obj` that `decode` inverts exactly."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": obj.hex()}
    if isinstance(obj, np.generic):  # numpy scalars keep their dtype as 0-d arrays
        return encode(np.asarray(obj))
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": _array_body(obj)}
    if isinstance(obj, torch.Tensor):
        if obj.dtype == torch.bfloat16:
            raise TypeError("bf16 tensors do not belong in JSON state; keep them in the DCP part")
        return {"__tensor__": _array_body(obj.detach().cpu().numpy())}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v) for v in obj]}
    if isinstance(obj, list):
        return [encode(v) for v in obj]
    if isinstance(obj, dict):
        plain = all(isinstance(k, str) for k in obj)
        if plain and not (len(obj) == 1 and next(iter(obj)) in _TAGS):  # no tag look-alikes
            return {k: encode(v) for k, v in obj.items()}
        return {"__dict__": [[encode(k), encode(v)] for k, v in obj.items()]}
    raise TypeError(f"cannot store {type(obj).__name__} in checkpoint JSON state")


def decode(obj: Any) -> Any:
    """Invert `encode`; raises ValueError/TypeError/KeyError on malformed input."""
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        ((tag, body),) = obj.items()
        if tag == "__tuple__":
            return tuple(decode(v) for v in body)
        if tag == "__float__":
            return float.fromhex(body)
        if tag == "__ndarray__":
            return _array_from(body)
        if tag == "__tensor__":
            return torch.from_numpy(_array_from(body).copy())
        if tag == "__dict__":
            return {decode(k): decode(v) for k, v in body}
    return {k: decode(v) for k, v in obj.items()}


def _array_body(a: np.ndarray) -> dict:
    if a.dtype.kind not in "biuf":
        raise TypeError(f"cannot store a numpy array of dtype {a.dtype} in checkpoint JSON state")
    data = a.reshape(-1).tolist()
    if a.dtype.kind == "f":  # exact bits, NaN/inf included
        data = [float(x).hex() for x in data]
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": data}


def _array_from(body: dict) -> np.ndarray:
    dtype = np.dtype(body["dtype"])
    if dtype.kind not in "biuf":
        raise ValueError(f"array dtype {dtype} is not allowed")
    data = body["data"]
    if dtype.kind == "f":
        data = [float.fromhex(x) for x in data]
    return np.asarray(data, dtype=dtype).reshape([int(n) for n in body["shape"]])


def plain_mode(path: Path) -> None:
    """Give `path` the permissions a plain open() would (0666 less the umask): safetensors
    0.8 writes its files 0600, which other users and serving processes cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (a no-op where directories cannot open)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def write_json_durable(path: Path, obj: Any, indent: int | None = None) -> None:
    """Write `encode(obj)` to `path` atomically: a temporary file, fsync, rename, fsync the dir."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(
            encode(obj), f, sort_keys=True, indent=indent, separators=None if indent else (",", ":")
        )
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_json(
    path: Path, what: str, fix: str = "resume from another checkpoint or delete this one"
) -> Any:
    """`decode` of the JSON file at `path`; a one-line BraidError (naming the file, ending with
    `fix`) if it is missing, unreadable, not UTF-8 or malformed."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise BraidError(f"{what} {path} is missing: {fix}") from None
    except OSError as e:
        raise BraidError(f"{what} {path} cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise BraidError(
            f"{what} {path} is not UTF-8 text (byte {e.start}): it is damaged; {fix}"
        ) from None
    try:
        return decode(json.loads(text))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise BraidError(
            f"{what} {path} is corrupt ({type(e).__name__}: {first_line(e)}); {fix}"
        ) from None
