"""Reading prepared token shards: a dataset view, the training batch loader, and val batches.

Contract:
- `TokenDataset` opens one split of a prepared dataset (memory-mapped, checked against its
  manifest) and reads any token range as int64, across shard boundaries.
- `BatchLoader` cuts the split into non-overlapping windows of seq_len+1 tokens and visits
  them in an order that depends only on (seed, epoch): epoch e is a permutation drawn from
  `np.random.default_rng([seed, e])`, and the global batch of call i is the next
  `batch_size` windows of that sequence (running on into the next epoch when one ends). Rank r
  of world_size takes rows [r*b, (r+1)*b) with b = batch_size // world_size, so the global
  batch is the same under any world size. `state_dict()` is an exact resume cursor.
- `val_batches` takes windows in file order from the start of the split (wrapping around when
  the split has fewer windows than asked for), with the same global-batch/rank-slice rule.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from braid.data.manifest import open_shard, read_manifest, tokenizer_file
from braid.errors import DataError

# Splits up to this size are checksummed on open by default: hashing runs at about 1 GB/s.
AUTO_VERIFY_BYTES = 256 << 20


class TokenDataset:
    """One split of a prepared dataset; `read(start, n)` gives tokens as an int64 array."""

    def __init__(
        self,
        path: str | Path,
        split: str = "train",
        *,
        vocab_size: int | None = None,
        verify: bool | None = None,
    ):
        """`verify`: check sha256 checksums; None checks them for splits up to 256 MiB."""
        self.path = Path(path)
        self.split = split
        self.manifest = man = read_manifest(self.path)
        if split not in man["splits"]:
            have = ", ".join(man["splits"]) or "none"
            raise DataError(f"split {split!r} is not in {str(self.path)!r} (splits: {have})")
        entry = man["splits"][split]
        if entry["tokens"] == 0:
            raise DataError(
                f"split {split!r} of {str(self.path)!r} is empty: re-run braid prep with more "
                "text or a larger val_fraction"
            )
        top = entry["max_token_id"]
        if vocab_size is not None and top >= vocab_size:
            raise DataError(
                f"token id {top} >= model.vocab_size={vocab_size} in {str(self.path)!r}: re-run "
                f"prep with a tokenizer of at most {vocab_size} tokens (--vocab-size "
                f"{vocab_size}) or raise model.vocab_size to at least {top + 1}"
            )
        if verify is None:
            verify = sum(sh["bytes"] for sh in entry["shards"]) <= AUTO_VERIFY_BYTES
        self.verified: bool = verify  # whether the shards' sha256 were checked
        self.shards = [open_shard(self.path, sh, man["dtype"], verify) for sh in entry["shards"]]
        self.shards = [s for s in self.shards if s.shape[0] > 0]
        self.offsets = np.cumsum([0] + [s.shape[0] for s in self.shards])
        self.num_tokens: int = int(self.offsets[-1])
        self.eot_id: int = man["tokenizer"]["eot_id"]
        self.max_token_id: int = top
        self.tokenizer_path: Path = tokenizer_file(self.path, man)

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as a fresh int64 array."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) out of [0, {self.num_tokens})")
        out = np.empty(length, dtype=np.int64)
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        done = 0
        while done < length:
            lo = start + done - int(self.offsets[k])
            n = min(length - done, self.shards[k].shape[0] - lo)
            out[done : done + n] = self.shards[k][lo : lo + n]
            done += n
            k += 1
        return out

    def __repr__(self) -> str:
        return f"TokenDataset({str(self.path)!r}, {self.split!r}, tokens={self.num_tokens})"


def _check_shape(
    dataset: TokenDataset, seq_len: int, batch_size: int, rank: int, world_size: int
) -> int:
    """Validate the batch geometry; the number of windows of seq_len+1 tokens."""
    if not isinstance(seq_len, int) or seq_len < 1:
        raise DataError(f"seq_len={seq_len!r}: must be a positive integer")
    if not isinstance(world_size, int) or world_size < 1:
        raise DataError(f"world_size={world_size!r}: must be a positive integer")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise DataError(f"rank={rank!r}: must be in [0, world_size={world_size})")
    if not isinstance(batch_size, int) or batch_size < 1 or batch_size % world_size:
        raise DataError(
            f"batch_size={batch_size!r}: the global batch must be a positive multiple of "
            f"world_size={world_size} (each rank takes batch_size // world_size sequences)"
        )
    windows = dataset.num_tokens // (seq_len + 1)
    if windows < 1:
        raise DataError(
            f"split {dataset.split!r} of {str(dataset.path)!r} has {dataset.num_tokens} tokens, "
            f"fewer than one sequence of seq_len+1={seq_len + 1}: use more text, a larger "
            "val_fraction, or a shorter seq_len"
        )
    return windows


def _rows(
    dataset: TokenDataset, windows: np.ndarray, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    w = seq_len + 1
    if len(windows) == 0:
        data = np.empty((0, w), dtype=np.int64)
    else:
        data = np.stack([dataset.read(int(i) * w, w) for i in windows])
        top = int(data.max())  # a few thousand ids on the host: cheap, and an embedding
        if top > dataset.max_token_id:  # lookup past the vocabulary would fail mid-step
            raise DataError(
                f"token id {top} in {str(dataset.path)!r} exceeds the manifest's max_token_id="
                f"{dataset.max_token_id}: the shards changed after the manifest was written; "
                "re-run braid prep"
            )
    t = torch.from_numpy(data)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class BatchLoader:
    """Deterministic, resumable (x, y) batches of this rank's share of each global batch."""

    def __init__(
        self,
        dataset: TokenDataset,
        *,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ):
        self.num_windows = _check_shape(dataset, seq_len, batch_size, rank, world_size)
        if not isinstance(seed, int) or seed < 0:
            raise DataError(f"seed={seed!r}: the data order needs a non-negative integer seed")
        self.dataset, self.seq_len, self.batch_size = dataset, seq_len, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        self.local_batch = batch_size // world_size
        self.epoch = 0
        self.position = 0  # windows of `epoch`'s order already handed out
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def order(self, epoch: int) -> np.ndarray:
        """The window indices of `epoch`, in visiting order."""
        if epoch != self._order_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order, self._order_epoch = rng.permutation(self.num_windows), epoch
        return self._order

    def _take_global(self) -> np.ndarray:
        """The window indices of the next global batch; advances the cursor."""
        picked = []
        need = self.batch_size
        while need:
            chunk = self.order(self.epoch)[self.position : self.position + need]
            picked.append(chunk)
            need -= len(chunk)
            self.position += len(chunk)
            if self.position == self.num_windows:
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(picked)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), int64 [batch_size // world_size, seq_len]; y is x shifted by one token."""
        b = self.local_batch
        mine = self._take_global()[self.rank * b : (self.rank + 1) * b]
        return _rows(self.dataset, mine, self.seq_len)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_windows": self.num_windows,
        }

    def load_state_dict(self, state: dict) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        same = (
            state.get("seed", self.seed) == self.seed
            and state.get("num_windows", self.num_windows) == self.num_windows
        )
        if not same:
            # A different seed, dataset or seq_len gives a different order: the cursor can no
            # longer resume exactly, so keep the epoch and clamp the position (no crash).
            warnings.warn(
                f"data loader state is for seed={state.get('seed')} with "
                f"{state.get('num_windows')} windows, now seed={self.seed} with "
                f"{self.num_windows}: the data order after resume differs from an unbroken run",
                stacklevel=2,
            )
            position = min(position, self.num_windows)
        if epoch < 0 or not 0 <= position <= self.num_windows:
            raise DataError(
                f"data loader state epoch={epoch}, position={position} is invalid "
                f"for {self.num_windows} windows: the checkpoint is corrupt"
            )
        self.epoch, self.position = epoch, position
        if self.position == self.num_windows:
            self.epoch, self.position = self.epoch + 1, 0


def val_batches(
    dataset: TokenDataset,
    *,
    seq_len: int,
    batch_size: int,
    num_batches: int,
    rank: int = 0,
    world_size: int = 1,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`num_batches` fixed (x, y) batches: windows in order, this rank's rows of each."""
    windows = _check_shape(dataset, seq_len, batch_size, rank, world_size)
    if not isinstance(num_batches, int) or num_batches < 0:
        raise DataError(f"num_batches={num_batches!r}: must be a non-negative integer")
    b = batch_size // world_size
    out = []
    for j in range(num_batches):
        ids = (np.arange(batch_size, dtype=np.int64) + j * batch_size) % windows
        out.append(_rows(dataset, ids[rank * b : (rank + 1) * b], seq_len))
    return out
