"""Non-tensor checkpoint state: the JSON codec is lossless, RNG streams come back exactly,
and damaged JSON gives one-line BraidErrors."""

import json
import math
import random

import numpy as np
import pytest
import torch

from braid.checkpoint import rng
from braid.checkpoint.state import decode, encode, read_json, write_json_durable
from braid.errors import BraidError


def test_codec_round_trips_types_and_bits_exactly():
    obj = {
        "ints": [0, -1, 2**80],
        "t": (1, (2.5, None), "s"),
        "flag": True,
        "floats": [0.1, -0.0, float("inf"), 1e-310],
        "nan": float("nan"),
        "arr": np.arange(6, dtype=np.uint32).reshape(2, 3),
        "f32": np.float32(1 / 3),
        "tensor": torch.tensor([1.5, -2.25]),
        "bytes": torch.arange(5, dtype=torch.uint8),
        7: "int key",
        "nested": {"__tuple__": "a key that looks like a tag"},
    }
    back = decode(json.loads(json.dumps(encode(obj))))
    assert back["ints"] == [0, -1, 2**80] and back["t"] == (1, (2.5, None), "s")
    assert isinstance(back["t"], tuple) and isinstance(back["t"][1], tuple)
    assert [math.copysign(1, x) for x in back["floats"][:2]] == [1, -1]
    assert back["floats"][1:] == obj["floats"][1:] and math.isnan(back["nan"])
    assert back["arr"].dtype == np.uint32 and (back["arr"] == obj["arr"]).all()
    assert back["f32"].dtype == np.float32 and back["f32"] == np.float32(1 / 3)
    assert torch.equal(back["tensor"], obj["tensor"]) and back["bytes"].dtype == torch.uint8
    assert back[7] == "int key" and back["nested"] == {"__tuple__": "a key that looks like a tag"}


def test_codec_refuses_objects_it_cannot_store_exactly():
    with pytest.raises(TypeError, match="cannot store object"):
        encode({"x": object()})
    with pytest.raises(TypeError, match="dtype"):
        encode(np.array(["a"]))


def test_rng_restore_repeats_every_stream():
    cpu = torch.device("cpu")
    random.random(), np.random.rand(), torch.rand(1)  # move off any seeded start
    snap = decode(json.loads(json.dumps(encode(rng.capture(cpu)))))

    def draws():
        return (
            random.random(),
            random.gauss(0, 1),
            np.random.rand(3).tolist(),
            np.random.standard_normal(),
            torch.rand(4).tolist(),
            torch.randn(2).tolist(),
        )

    first = draws()
    rng.restore(snap, cpu)
    assert draws() == first


def test_json_state_writes_atomically_and_reports_damage_in_one_line(tmp_path):
    path = tmp_path / "state.json"
    write_json_durable(path, {"a": (1, 2)})
    assert read_json(path, "state") == {"a": (1, 2)}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary left behind
    path.write_text(path.read_text()[:5])  # truncated
    with pytest.raises(BraidError, match="state .* is corrupt") as e:
        read_json(path, "state")
    assert "\n" not in str(e.value)
    with pytest.raises(BraidError, match="is missing"):
        read_json(tmp_path / "nope.json", "state")
