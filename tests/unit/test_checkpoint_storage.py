"""DCP tensor storage: round trip, and a tampered or truncated checkpoint is refused with a
one-line BraidError without running any pickled code."""

import os
import pickle
from pathlib import Path

import pytest
import torch

from braid.checkpoint.storage import METADATA_FILE, load_tensors, read_metadata, save_tensors
from braid.errors import BraidError


def _tree():
    g = torch.Generator().manual_seed(0)
    return {
        "model": {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)},
        "optim": {"w": {"step": torch.tensor(3.0)}},
    }


def _zeros_like(tree):
    return {
        k: _zeros_like(v) if isinstance(v, dict) else torch.zeros_like(v) for k, v in tree.items()
    }


def test_tensors_round_trip_in_place(tmp_path):
    src = _tree()
    save_tensors(src, tmp_path, distributed=False)
    dst = _zeros_like(src)
    load_tensors(dst, tmp_path, distributed=False)
    assert torch.equal(dst["model"]["w"], src["model"]["w"])
    assert torch.equal(dst["optim"]["w"]["step"], src["optim"]["w"]["step"])
    model_only = {"model": _zeros_like(src)["model"]}  # inference loads only the model
    load_tensors(model_only, tmp_path, distributed=False)
    assert torch.equal(model_only["model"]["b"], src["model"]["b"])
    smaller = {"model": {"w": torch.zeros(4, 3)}}  # a smaller model must not load silently
    with pytest.raises(BraidError, match="holds 1 model tensors this model lacks"):
        load_tensors(smaller, tmp_path, distributed=False)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickled_code_in_metadata_is_refused_not_run(tmp_path, monkeypatch):
    save_tensors(_tree(), tmp_path, distributed=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / METADATA_FILE).write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(BraidError, match="refusing to load global (posix|os).system") as e:
        load_tensors(_zeros_like(_tree()), tmp_path, distributed=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "PWNED").exists()


def test_non_tensor_entries_are_refused(tmp_path):
    tree = _tree()
    save_tensors(tree, tmp_path, distributed=False)
    md = read_metadata(tmp_path)
    # A file claiming that a key holds a pickled object (DCP would torch.load it unsafely).
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    md.state_dict_metadata["model.w"] = BytesStorageMetadata()
    (tmp_path / METADATA_FILE).write_bytes(pickle.dumps(md))
    with pytest.raises(BraidError, match="refusing to load global .*BytesStorageMetadata"):
        load_tensors(_zeros_like(tree), tmp_path, distributed=False)


def test_tensor_reads_stay_inside_the_checkpoint(tmp_path):
    """A .metadata whose storage entries point at another checkpoint's file (or any path) is
    refused before DCP opens anything."""
    import dataclasses

    ckpt, other = tmp_path / "ckpt", tmp_path / "other"
    save_tensors(_tree(), ckpt, distributed=False)
    planted = {
        k: {kk: vv + 7 for kk, vv in v.items()} if k == "model" else v for k, v in _tree().items()
    }
    save_tensors(planted, other, distributed=False)
    md = read_metadata(ckpt)
    original = md.storage_data
    for bad in ("../other/{}", str(other) + "/{}", "sub/{}"):
        md.storage_data = {
            k: dataclasses.replace(v, relative_path=bad.format(Path(v.relative_path).name))
            for k, v in original.items()
        }
        (ckpt / METADATA_FILE).write_bytes(pickle.dumps(md))
        dst = _zeros_like(_tree())
        with pytest.raises(BraidError, match="outside the checkpoint's own files") as e:
            load_tensors(dst, ckpt, distributed=False)
        assert "\n" not in str(e.value) and not dst["model"]["w"].any()


def test_truncated_files_give_one_line_errors(tmp_path):
    save_tensors(_tree(), tmp_path, distributed=False)
    data = next(p for p in tmp_path.iterdir() if p.suffix == ".distcp")
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(BraidError, match="cannot be loaded") as e:
        load_tensors(_zeros_like(_tree()), tmp_path, distributed=False)
    assert "\n" not in str(e.value)
    meta = tmp_path / METADATA_FILE
    meta.write_bytes(meta.read_bytes()[:50])
    with pytest.raises(BraidError, match="is corrupt or not a braid checkpoint"):
        load_tensors(_zeros_like(_tree()), tmp_path, distributed=False)


def test_missing_tensor_names_the_key(tmp_path):
    save_tensors(_tree(), tmp_path, distributed=False)
    with pytest.raises(BraidError, match="first: model.extra"):
        load_tensors({"model": {"extra": torch.zeros(1)}}, tmp_path, distributed=False)


def test_torch_advice_to_unpickle_never_reaches_the_user():
    from braid.checkpoint.storage import _one_line

    e = RuntimeError(
        "Weights only load failed. Re-running `torch.load` with `weights_only` set "
        "to `False` will likely succeed, but it can result in arbitrary code "
        "execution.\nmore"
    )
    assert "False" not in _one_line(e) and "refuses" in _one_line(e)


def test_a_full_disk_under_torch_c_plus_plus_writer_is_named(tmp_path):
    from braid.checkpoint.storage import save_error

    e = RuntimeError(
        "[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed "
        "writing file data/0: file write failed"
    )
    msg = str(save_error(e, tmp_path / "ckpt"))
    assert "No space left on device" in msg and "MiB free there" in msg
    assert "the previous checkpoint is intact" in msg and "\n" not in msg
