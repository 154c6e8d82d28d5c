"""braid.data shards: dataset checks, deterministic batches across world sizes, exact resume."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from braid.data.prep import prepare
from braid.data.shards import BatchLoader, TokenDataset, val_batches
from braid.errors import DataError


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    rng = random.Random(0)
    words = "the king queen sword crown night day love death speak hear thee thou".split()
    for k in range(3):
        doc = "\n".join(" ".join(rng.choices(words, k=12)) for _ in range(150))
        (root / f"doc{k}.txt").write_text(doc)
    prepare(
        [root], root / "ds", vocab_size=300, val_fraction=0.1, shard_tokens=1000, progress=False
    )
    return root / "ds"


def _all_tokens(path, split):
    man = json.loads((path / "manifest.json").read_text())
    return np.concatenate([np.load(path / s["file"]) for s in man["splits"][split]["shards"]])


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_dataset_reads_across_shards(data_dir):
    ds = TokenDataset(data_dir, "train", vocab_size=300)
    ref = _all_tokens(data_dir, "train").astype(np.int64)
    assert len(ds.shards) > 1 and ds.num_tokens == len(ds) == len(ref)
    assert ds.tokenizer_path == data_dir / "tokenizer.json" and ds.tokenizer_path.is_file()
    for start in (0, 990, 999, 1000, 1999, ds.num_tokens - 7):
        np.testing.assert_array_equal(ds.read(start, 7), ref[start : start + 7])
    np.testing.assert_array_equal(ds.read(0, ds.num_tokens), ref)
    with pytest.raises(IndexError):
        ds.read(ds.num_tokens - 3, 4)
    assert TokenDataset(data_dir, "val").num_tokens > 0


def test_dataset_errors(data_dir, tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        TokenDataset(tmp_path / "nope")
    with pytest.raises(DataError, match="no manifest.json"):
        TokenDataset(tmp_path)
    with pytest.raises(DataError, match="split 'test' is not in"):
        TokenDataset(data_dir, "test")
    with pytest.raises(DataError, match=r"token id \d+ >= model.vocab_size=100"):
        TokenDataset(data_dir, "train", vocab_size=100)

    bad = _copy(data_dir, tmp_path / "badjson")
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        TokenDataset(bad)
    man = json.loads((data_dir / "manifest.json").read_text())
    del man["splits"]["train"]["shards"][0]["sha256"]
    (bad / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DataError, match="corrupt"):
        TokenDataset(bad)


def test_the_tokenizer_stays_inside_the_dataset_and_matches_its_checksum(data_dir, tmp_path):
    """A run and its exports copy the dataset's tokenizer: a manifest naming a file outside its
    directory, or a tokenizer that is not the one prep hashed, is refused before any copy."""
    secret = tmp_path / "secret.txt"
    secret.write_text("not a tokenizer")
    man = json.loads((data_dir / "manifest.json").read_text())
    for name in (str(secret), "../secret.txt", "sub/tokenizer.json"):
        d = _copy(data_dir, tmp_path / f"esc{len(name)}")
        (d / "manifest.json").write_text(
            json.dumps({**man, "tokenizer": {**man["tokenizer"], "file": name}})
        )
        with pytest.raises(DataError, match="tokenizer name") as e:
            TokenDataset(d, "train")
        assert "\n" not in str(e.value)
    d = _copy(data_dir, tmp_path / "swapped")
    (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text().replace("king", "kong"))
    with pytest.raises(DataError, match="tokenizer .* fails its sha256 check"):
        TokenDataset(d, "train", verify=False)  # small and always checked
    no_sha = {k: v for k, v in man["tokenizer"].items() if k != "sha256"}
    (d / "manifest.json").write_text(json.dumps({**man, "tokenizer": no_sha}))
    with pytest.raises(DataError, match="no 'tokenizer.sha256'"):
        TokenDataset(d, "train")


def test_corrupt_and_truncated_shards(data_dir, tmp_path):
    d = _copy(data_dir, tmp_path / "c")
    shard = d / "train_000001.npy"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF  # same size, different data: only the checksum can tell
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="sha256"):
        TokenDataset(d, verify=True)
    with pytest.raises(DataError, match="sha256"):
        TokenDataset(d)  # small datasets are verified by default
    TokenDataset(d, verify=False)  # opt-out skips the hash

    shard.write_bytes(bytes(raw[:-10]))
    with pytest.raises(DataError, match="truncated"):
        TokenDataset(d, verify=False)
    raw[:10] = b"garbage!!!"  # a broken .npy header with the right size
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="not a readable .npy"):
        TokenDataset(d, verify=False)
    shard.unlink()
    with pytest.raises(DataError, match="missing"):
        TokenDataset(d)


def test_empty_split(tmp_path):
    (tmp_path / "a.txt").write_text("hello world, hello there\n" * 20)
    prepare([tmp_path / "a.txt"], tmp_path / "o", vocab_size=280, val_fraction=0.0, progress=False)
    with pytest.raises(DataError, match="split 'val' .* is empty"):
        TokenDataset(tmp_path / "o", "val")


def test_batches_are_windows(data_dir):
    ds = TokenDataset(data_dir)
    ref = torch.from_numpy(_all_tokens(data_dir, "train").astype(np.int64))
    loader = BatchLoader(ds, seq_len=16, batch_size=4, seed=3)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row, yrow in zip(x, y, strict=True):
        starts = [i for i in range(0, len(ref) - 16, 17) if torch.equal(ref[i : i + 16], row)]
        assert starts and torch.equal(ref[starts[0] + 1 : starts[0] + 17], yrow)


def test_epoch_visits_every_window_once(data_dir):
    ds = TokenDataset(data_dir)
    loader = BatchLoader(ds, seq_len=32, batch_size=5, seed=1)
    n = loader.num_windows
    seen = np.concatenate([loader._take_global() for _ in range(n // 5)])
    assert len(set(seen.tolist())) == len(seen)
    first = loader.order(0).copy()
    assert not np.array_equal(first, loader.order(1))  # reshuffled per epoch
    assert np.array_equal(first, BatchLoader(ds, seq_len=32, batch_size=5, seed=1).order(0))
    assert not np.array_equal(first, BatchLoader(ds, seq_len=32, batch_size=5, seed=2).order(0))


def test_global_batches_run_through_each_epoch_s_order_into_the_next(data_dir):
    """The global batches are consecutive `batch_size` windows of order(0), order(1), ...: a
    batch that straddles an epoch's end takes the next epoch's first windows, none skipped."""
    ds = TokenDataset(data_dir)
    loader = BatchLoader(ds, seq_len=24, batch_size=7, seed=3)
    n = loader.num_windows
    assert n % 7  # some batches straddle an epoch boundary
    steps = 3 * n // 7 + 1
    got = np.concatenate([loader._take_global() for _ in range(steps)])
    ref = BatchLoader(ds, seq_len=24, batch_size=7, seed=3)
    want = np.concatenate([ref.order(e).copy() for e in range(4)])[: 7 * steps]
    np.testing.assert_array_equal(got, want)
    assert loader.state_dict()["epoch"] == 7 * steps // n
    assert loader.state_dict()["position"] == 7 * steps % n


def test_a_token_one_past_the_manifest_s_max_token_id_is_refused(data_dir, tmp_path):
    d = _copy(data_dir, tmp_path / "stale")
    man = json.loads((d / "manifest.json").read_text())
    top = man["splits"]["train"]["max_token_id"]
    man["splits"]["train"]["max_token_id"] = top - 1  # the shards hold `top`: one past it
    (d / "manifest.json").write_text(json.dumps(man))
    ds = TokenDataset(d, "train")
    loader = BatchLoader(ds, seq_len=ds.num_tokens // 2 - 1, batch_size=2)  # every window
    with pytest.raises(DataError, match=f"token id {top} .* max_token_id={top - 1}"):
        loader.next_batch()


def test_global_batch_same_for_any_world_size(data_dir):
    ds = TokenDataset(data_dir)
    steps = 3 * BatchLoader(ds, seq_len=24, batch_size=8).num_windows // 8 + 2  # > 2 epochs
    runs = {}
    for world in (1, 2, 4):
        loaders = [
            BatchLoader(ds, seq_len=24, batch_size=8, rank=r, world_size=world, seed=7)
            for r in range(world)
        ]
        runs[world] = []
        for _ in range(steps):
            parts = [ld.next_batch() for ld in loaders]
            assert parts[0][0].shape == (8 // world, 24)
            runs[world].append((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
    for world in (2, 4):
        for (x1, y1), (xw, yw) in zip(runs[1], runs[world], strict=True):
            assert torch.equal(x1, xw) and torch.equal(y1, yw)


def test_resume_gives_identical_continuation(data_dir):
    ds = TokenDataset(data_dir)
    a = BatchLoader(ds, seq_len=20, batch_size=6, seed=11)
    steps = 2 * a.num_windows // 6 + 3  # crosses epoch boundaries
    for _ in range(5):
        a.next_batch()
    state = a.state_dict()
    assert all(type(v) is int for v in state.values())
    rest = [a.next_batch() for _ in range(steps)]
    # Resume under a different world size: rank slices of the same global batches.
    b = [BatchLoader(ds, seq_len=20, batch_size=6, rank=r, world_size=2, seed=11) for r in range(2)]
    for ld in b:
        ld.load_state_dict(json.loads(json.dumps(state)))
    for x, y in rest:
        parts = [ld.next_batch() for ld in b]
        assert torch.equal(x, torch.cat([p[0] for p in parts]))
        assert torch.equal(y, torch.cat([p[1] for p in parts]))


def test_loader_errors(data_dir):
    ds = TokenDataset(data_dir)
    with pytest.raises(DataError, match="batch_size=6"):
        BatchLoader(ds, seq_len=8, batch_size=6, world_size=4)
    with pytest.raises(DataError, match="rank=2"):
        BatchLoader(ds, seq_len=8, batch_size=4, rank=2, world_size=2)
    with pytest.raises(DataError, match="fewer than one sequence"):
        BatchLoader(ds, seq_len=ds.num_tokens, batch_size=1)
    with pytest.raises(DataError, match="fewer than one sequence"):
        val_batches(TokenDataset(data_dir, "val"), seq_len=10**6, batch_size=2, num_batches=1)


def test_val_batches_fixed_and_sliced(data_dir):
    val = TokenDataset(data_dir, "val")
    seq = 30
    windows = val.num_tokens // (seq + 1)
    num = windows // 4 + 2  # asks for more windows than exist: wraps around
    one = val_batches(val, seq_len=seq, batch_size=4, num_batches=num)
    again = val_batches(val, seq_len=seq, batch_size=4, num_batches=num)
    assert len(one) == num
    for (x1, y1), (x2, y2) in zip(one, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    ref = torch.from_numpy(val.read(0, windows * (seq + 1))).view(windows, seq + 1)
    flat = torch.cat([x for x, _ in one])
    for i, row in enumerate(flat):
        assert torch.equal(row, ref[i % windows, :-1])
    halves = [
        val_batches(val, seq_len=seq, batch_size=4, num_batches=num, rank=r, world_size=2)
        for r in range(2)
    ]
    for j, (x, y) in enumerate(one):
        assert torch.equal(x, torch.cat([halves[0][j][0], halves[1][j][0]]))
        assert torch.equal(y, torch.cat([halves[0][j][1], halves[1][j][1]]))
    assert val_batches(val, seq_len=seq, batch_size=4, num_batches=0) == []


def _flip_a_token(d):
    """A shard of the same size with one token changed: only its sha256 can tell."""
    man = json.loads((d / "manifest.json").read_text())
    shard = d / man["splits"]["train"]["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 1
    shard.write_bytes(bytes(raw))


def test_a_changed_shard_of_the_same_size_fails_its_checksum(data_dir, tmp_path):
    d = _copy(data_dir, tmp_path / "flipped")
    _flip_a_token(d)
    with pytest.raises(DataError, match="fails its sha256 check"):
        TokenDataset(d, "train")  # small: checked by default
    assert not TokenDataset(d, "train", verify=False).verified


@pytest.mark.parametrize("verify", ["auto", "all", "sizes"])
def test_data_verify_picks_what_is_checked_at_start(
    data_dir, tmp_path, verify, capsys, monkeypatch
):
    """Above the automatic limit (lowered to 0 here), `auto` checks sizes and says so, `all`
    checks every shard's sha256, `sizes` checks sizes quietly."""
    from braid.config import load_config
    from braid.data import shards
    from braid.parallel.distributed import init_parallel
    from braid.train.model_setup import load_data

    d = _copy(data_dir, tmp_path / "flipped")
    _flip_a_token(d)
    monkeypatch.setattr(shards, "AUTO_VERIFY_BYTES", 0)
    over = [f"--data.path={d}", f"--data.verify={verify}", "--train.device=cpu"]
    cfg = load_config("tiny", [*over, "--model.vocab_size=300", "--train.seq_len=16"])
    if verify == "all":
        with pytest.raises(DataError, match="fails its sha256 check"):
            load_data(cfg, init_parallel(cfg))
        return
    assert len(load_data(cfg, init_parallel(cfg))[0]) > 0
    said = capsys.readouterr().err
    assert ("sha256 not (data.verify=all checks them)" in said) == (verify == "auto"), said
