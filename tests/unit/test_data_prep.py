"""braid.data prep: round trips, dtypes, manifest, input formats, errors and atomic output."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from braid.data import prep as prep_mod
from braid.data.corpus import _reusable, ensure_default_corpus, markdown_to_play
from braid.data.manifest import sha256_file
from braid.data.prep import prepare
from braid.data.sources import split_text
from braid.data.tokenizer import EOT, Tok, load_tokenizer, train_bpe
from braid.errors import DataError

TEXT_A = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind\n" * 40
TEXT_B = "Ünïcödé línes — with émoji 🎭 and\r\nwindows newlines.\n\n\n  indented   spaces\n" * 30


def _tokens(out, split):
    man = json.loads((out / "manifest.json").read_text())
    parts = [np.load(out / s["file"]) for s in man["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.empty(0, dtype=man["dtype"])


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_round_trip_text_files(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(TEXT_A, encoding="utf-8")
    (tmp_path / "in" / "b.md").write_bytes(TEXT_B.encode("utf-8"))
    out = tmp_path / "out"
    man = prepare(
        [tmp_path / "in"], out, vocab_size=300, val_fraction=0.1, shard_tokens=97, progress=False
    )
    assert man == json.loads((out / "manifest.json").read_text())
    assert man["dtype"] == "uint16" and man["documents"] == 2
    assert [s["path"].rsplit("/", 1)[-1] for s in man["sources"]] == ["a.txt", "b.md"]
    ids = np.concatenate([_tokens(out, "train"), _tokens(out, "val")]).tolist()
    tok = Tok.from_file(out / "tokenizer.json")
    assert tok.eot_id == man["tokenizer"]["eot_id"]
    assert tok.decode(ids) == TEXT_A + EOT + TEXT_B + EOT
    assert ids.count(tok.eot_id) == 2 and ids[-1] == tok.eot_id
    assert max(ids) == man["max_token_id"] < man["tokenizer"]["vocab_size"] <= 300
    total = man["splits"]["train"]["tokens"] + man["splits"]["val"]["tokens"]
    assert man["splits"]["val"]["tokens"] == round(0.1 * total)
    assert len(man["splits"]["train"]["shards"]) > 1  # shard_tokens=97 forces several
    assert _leftovers(tmp_path) == []


def test_manifest_checksums_and_sizes(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT_A)
    man = prepare(
        [tmp_path / "a.txt"], tmp_path / "o", vocab_size=280, shard_tokens=50, progress=False
    )
    for split in man["splits"].values():
        assert split["tokens"] == sum(s["tokens"] for s in split["shards"])
        for s in split["shards"]:
            p = tmp_path / "o" / s["file"]
            assert sha256_file(p) == s["sha256"] and p.stat().st_size == s["bytes"]
            assert np.load(p).shape == (s["tokens"],)
    assert man["splits"]["val"]["tokens"] >= 1
    assert sha256_file(tmp_path / "o" / "tokenizer.json") == man["tokenizer"]["sha256"]


def test_each_split_s_max_token_id_is_over_all_its_shards(tmp_path):
    (tmp_path / "b.txt").write_text(TEXT_B + TEXT_A)  # the rarest (highest) ids come first
    out = tmp_path / "o"
    man = prepare([tmp_path / "b.txt"], out, vocab_size=300, shard_tokens=50, progress=False)
    for name, split in man["splits"].items():
        ids = _tokens(out, name)
        assert split["max_token_id"] == int(ids.max()), name
    train = man["splits"]["train"]["shards"]
    assert int(np.load(out / train[-1]["file"]).max()) < man["splits"]["train"]["max_token_id"]


def test_a_tiny_val_fraction_still_holds_out_one_token(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT_A)
    man = prepare(
        [tmp_path / "a.txt"], tmp_path / "o", vocab_size=280, val_fraction=1e-6, progress=False
    )
    total = man["splits"]["train"]["tokens"] + man["splits"]["val"]["tokens"]
    assert round(total * 1e-6) == 0 and man["splits"]["val"]["tokens"] == 1


def test_bpe_is_deterministic_and_pieces_keep_ids():
    texts = [TEXT_A, TEXT_B]
    assert train_bpe(texts, 320).to_str() == train_bpe(texts, 320).to_str()
    tok = Tok(train_bpe(texts, 320))
    text = (TEXT_B + TEXT_A) * 3
    pieces = list(split_text([text], limit=60))
    assert "".join(pieces) == text and max(map(len, pieces)) <= 60
    assert sum(tok.encode_batch(pieces), []) == tok.encode(text)


def test_uint32_when_vocab_exceeds_uint16(tmp_path):
    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["[UNK]"], vocab[EOT] = 70_000, 70_001
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.save(str(tmp_path / "big.json"))
    (tmp_path / "a.txt").write_text("w1 w69999 w65536 w2 " * 20)
    man = prepare(
        [tmp_path / "a.txt"],
        tmp_path / "o",
        tokenizer=str(tmp_path / "big.json"),
        vocab_size=300,
        progress=False,
    )  # vocab_size only matters when training
    assert man["dtype"] == "uint32" and man["tokenizer"]["vocab_size"] == 70_002
    ids = np.concatenate([_tokens(tmp_path / "o", "train"), _tokens(tmp_path / "o", "val")])
    assert ids.dtype == np.uint32 and ids[:4].tolist() == [1, 69999, 65536, 2]
    assert ids[-1] == 70_001 and man["max_token_id"] == 70_001


def test_existing_tokenizer_is_reused(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT_A)
    prepare([tmp_path / "a.txt"], tmp_path / "o1", vocab_size=400, progress=False)
    man = prepare(
        [tmp_path / "a.txt"],
        tmp_path / "o2",
        tokenizer=str(tmp_path / "o1" / "tokenizer.json"),
        vocab_size=260,
        progress=False,
    )
    assert (tmp_path / "o1" / "tokenizer.json").read_text() == (
        tmp_path / "o2" / "tokenizer.json"
    ).read_text()
    assert man["tokenizer"]["vocab_size"] > 260


def test_jsonl_input(tmp_path):
    lines = [
        {"text": "first document"},
        {"text": ""},
        {"body": 1, "text": None},
        {"text": "second one\nwith a newline"},
    ]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    man = prepare([p], tmp_path / "o", vocab_size=270, val_fraction=0.0, progress=False)
    assert man["documents"] == 2 and man["splits"]["val"]["tokens"] == 0
    tok = Tok.from_file(tmp_path / "o" / "tokenizer.json")
    assert (
        tok.decode(_tokens(tmp_path / "o", "train").tolist())
        == f"first document{EOT}second one\nwith a newline{EOT}"
    )
    p.write_text('{"text": "ok"}\n{"content": "x"}\n')
    with pytest.raises(DataError, match="line 2 has no field 'text'"):
        prepare([p], tmp_path / "o3", vocab_size=270, progress=False)
    p.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        prepare([p], tmp_path / "o4", vocab_size=270, progress=False)
    assert not (tmp_path / "o3").exists() and _leftovers(tmp_path) == []


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="needs pyarrow")
def test_parquet_input(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"text": ["alpha beta", None, "gamma"], "n": [1, 2, 3]}), tmp_path / "d.parquet"
    )
    man = prepare(
        [tmp_path / "d.parquet"], tmp_path / "o", vocab_size=270, val_fraction=0.0, progress=False
    )
    tok = Tok.from_file(tmp_path / "o" / "tokenizer.json")
    assert man["documents"] == 2
    assert tok.decode(_tokens(tmp_path / "o", "train").tolist()) == f"alpha beta{EOT}gamma{EOT}"
    with pytest.raises(DataError, match="no column 'body'"):
        prepare([tmp_path / "d.parquet"], tmp_path / "o2", text_field="body", progress=False)


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is not None, reason="pyarrow present")
def test_parquet_without_pyarrow_says_what_to_install(tmp_path):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="pip install pyarrow"):
        prepare([tmp_path / "d.parquet"], tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets present")
def test_hf_dataset_without_datasets(tmp_path):
    with pytest.raises(DataError, match="pip install datasets"):
        prepare([], tmp_path / "o", hf_dataset="tiny_shakespeare", progress=False)


def test_empty_corpus_leaves_nothing(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(DataError, match="no text found"):
        prepare(
            [tmp_path / "empty.txt", tmp_path / "e.jsonl"],
            tmp_path / "out",
            vocab_size=300,
            progress=False,
        )
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    (tmp_path / "out").mkdir()  # an existing empty out_dir stays empty
    with pytest.raises(DataError, match="no text found"):
        prepare([tmp_path / "empty.txt"], tmp_path / "out", vocab_size=300, progress=False)
    assert list((tmp_path / "out").iterdir()) == [] and _leftovers(tmp_path) == []


def test_input_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare([tmp_path / "nope.txt"], tmp_path / "o", progress=False)
    with pytest.raises(DataError, match="no inputs"):
        prepare([], tmp_path / "o", progress=False)
    (tmp_path / "bin.dat").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01")
    with pytest.raises(DataError, match="not UTF-8 text|looks binary"):
        prepare([tmp_path / "bin.dat"], tmp_path / "o", progress=False)
    (tmp_path / "a.txt").write_text(TEXT_A)
    with pytest.raises(DataError, match="vocab_size=100"):
        prepare([tmp_path / "a.txt"], tmp_path / "o", vocab_size=100, progress=False)
    with pytest.raises(DataError, match="val_fraction"):
        prepare([tmp_path / "a.txt"], tmp_path / "o", val_fraction=1.5, progress=False)
    with pytest.raises(DataError, match="does not exist"):
        prepare([tmp_path / "a.txt"], tmp_path / "o", tokenizer=str(tmp_path / "t.json"))
    assert not (tmp_path / "o").exists() and _leftovers(tmp_path) == []


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"version": "1.0", "model": 3')
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")


def test_out_dir_rules(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text(TEXT_A)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a braid dataset"):
        prepare([tmp_path / "a.txt"], foreign, vocab_size=300, progress=False)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    out = tmp_path / "o"
    first = prepare([tmp_path / "a.txt"], out, vocab_size=300, progress=False)
    (tmp_path / "b.txt").write_text(TEXT_B)
    second = prepare([tmp_path / "b.txt"], out, vocab_size=300, progress=False)
    assert (
        second["sources"] != first["sources"]
        and json.loads((out / "manifest.json").read_text()) == second
    )
    assert _leftovers(tmp_path) == []

    # A failure while replacing keeps the previous dataset untouched.
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prep_mod, "_write_splits", boom)
    with pytest.raises(RuntimeError):
        prepare([tmp_path / "a.txt"], out, vocab_size=300, progress=False)
    assert json.loads((out / "manifest.json").read_text()) == second
    assert _leftovers(tmp_path) == []


def test_markdown_to_play():
    md = (
        "# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_Enter BERNARDO_\n\n"
        "**BERNARDO**  \nWho's there?  \nStand \\-- ho! &amp; c.\n\n__\\[Aside]_  \n"
    )
    assert markdown_to_play(md) == (
        "Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\nEnter BERNARDO\n\n"
        "BERNARDO:\nWho's there?\nStand -- ho! & c.\n\n[Aside]\n"
    )


def test_default_corpus(tmp_path):
    path = ensure_default_corpus(tmp_path, vocab_size=512, progress=False)
    assert path == tmp_path / "shakespeare-v512"
    man = json.loads((path / "manifest.json").read_text())
    assert man["documents"] == man["extra"]["plays"] >= 30
    assert man["max_token_id"] < 512 and man["splits"]["val"]["tokens"] > 10_000
    stamp = (path / "manifest.json").stat().st_mtime_ns
    assert ensure_default_corpus(tmp_path, vocab_size=512, progress=False) == path
    assert (path / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    tok = Tok.from_file(path / "tokenizer.json")
    head = tok.decode(np.load(path / "train_000000.npy", mmap_mode="r")[:300].tolist())
    assert ":\n" in head and "**" not in head and "#" not in head
    # A damaged or stale copy is rebuilt rather than trusted.
    assert _reusable(path, man["extra"], 0.05) and not _reusable(path, man["extra"], 0.1)
    assert not _reusable(path, {**man["extra"], "corpus_version": -1}, 0.05)
    (path / "val_000000.npy").write_bytes(b"")
    assert not _reusable(path, man["extra"], 0.05)
