"""`braid export` and inference loading: the exported safetensors hold the full single-process
model, and a run directory and its export give identical logits."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from braid.checkpoint import paths
from braid.checkpoint.export import export
from braid.checkpoint.load import load_for_inference
from braid.config import load_config
from braid.errors import BraidError
from braid.model.transformer import Transformer
from braid.train.trainer import train
from tiny_run import TINY_MODEL, prepare_words

TINY = [
    *TINY_MODEL,
    "--train.batch_size=4",
    "--train.seq_len=32",
    "--train.steps=3",
    "--train.val_batches=1",
    "--train.progress=false",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    words = "a mixture of experts routes each token to the best two of eight".split()
    data = prepare_words(root, words, seed=1, count=8000)
    cfg = load_config(
        None, TINY + [f"--data.path={data}", f"--run.dir={root / 'runs'}", "--run.name=r"]
    )
    result = train(cfg)
    return root / "runs" / "r", result


def test_export_writes_full_tensors_and_matches_the_run_logits(run_dir, tmp_path):
    run, _ = run_dir
    out = tmp_path / "exported"
    # the CLI wiring, as a user runs it
    proc = subprocess.run(
        [sys.executable, "-m", "braid", "export", "--run", str(run), "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert (out / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()

    cfg = load_config(None, TINY)
    with torch.device("meta"):
        reference = Transformer(cfg.model, cfg.moe).state_dict()
    with safe_open(out / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(reference)  # single-process names, nothing missing
        for name in f.keys():
            assert tuple(f.get_slice(name).get_shape()) == tuple(reference[name].shape)
        assert f.metadata()["step"] == "3"
    assert json.loads((out / "config.json").read_text())["step"] == 3
    experts = [k for k in reference if ".experts." in k]
    assert experts and all(reference[k].shape[0] == cfg.moe.num_experts for k in experts)

    cpu = torch.device("cpu")
    from_run, tok_run = load_for_inference(run, cpu)
    from_export, tok_export = load_for_inference(out, cpu)
    assert tok_run == run / "tokenizer.json" and tok_export == out / "tokenizer.json"
    idx = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = from_run(idx).logits, from_export(idx).logits
    assert torch.equal(a, b) and torch.isfinite(a).all()


def test_export_refuses_foreign_dirs_and_replaces_its_own(run_dir, tmp_path):
    run, _ = run_dir
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    with pytest.raises(BraidError, match="not a braid export"):
        export(run, foreign)
    assert (foreign / "todo.txt").read_text() == "keep me"
    (foreign / "model.safetensors").write_bytes(b"")  # weights beside a foreign file
    with pytest.raises(BraidError, match="not a braid export"):
        export(run, foreign)
    assert (foreign / "todo.txt").read_text() == "keep me"
    out = export(run, tmp_path / "e")
    assert export(run, out) == out  # a previous export is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "notes"]  # no temporaries left


def test_an_altered_tokenizer_is_refused_by_its_checksum(run_dir, tmp_path):
    run, _ = run_dir
    out = export(run, tmp_path / "e")
    tok = out / "tokenizer.json"
    tok.write_bytes(tok.read_bytes() + b" ")  # still valid JSON, other bytes
    with pytest.raises(BraidError, match="tokenizer.json does not match its") as e:
        load_for_inference(out, torch.device("cpu"))
    assert "\n" not in str(e.value)


def test_damaged_weights_give_one_line_errors(run_dir, tmp_path):
    run, _ = run_dir
    out = export(run, tmp_path / "e")
    weights = out / "model.safetensors"
    intact = weights.read_bytes()
    flipped = bytearray(intact)
    for i in range(len(flipped) - 64, len(flipped)):  # inside the last tensor's payload
        flipped[i] ^= 0xFF
    for damaged in (bytes(flipped), intact[:1000]):  # same size with flipped bits; truncated
        weights.write_bytes(damaged)
        with pytest.raises(BraidError, match="model.safetensors does not match its") as e:
            load_for_inference(out, torch.device("cpu"))
        assert "\n" not in str(e.value)
    # an export written before hashes existed: the safetensors reader still catches truncation
    body = json.loads((out / "config.json").read_text())
    del body["hashes"]
    (out / "config.json").write_text(json.dumps(body))
    with pytest.raises(BraidError, match="model.safetensors is corrupt or truncated") as e:
        load_for_inference(out, torch.device("cpu"))
    assert "\n" not in str(e.value)
    with pytest.raises(BraidError, match="holds no complete checkpoint"):
        load_for_inference(tmp_path, torch.device("cpu"))
    ckpt = paths.latest(run)
    assert load_for_inference(ckpt, torch.device("cpu"))[1] == run / "tokenizer.json"


@pytest.mark.parametrize("through", [False, True])
def test_generate_stops_at_the_end_of_text_unless_told_to_go_through(
    run_dir, monkeypatch, capsys, through
):
    """`braid generate` stops once the model gives the tokenizer's end-of-text token and prints
    the text before it; `--through-eot` samples on past it, printing every token."""
    import braid.generate
    from braid.cli import main
    from braid.data.tokenizer import Tok

    run, _ = run_dir
    tok = Tok.from_file(run / "tokenizer.json")
    seen = {}

    def fake_generate(model, prompt_BT, n_new, *, stop_token=None, **kw):
        seen["stop"] = stop_token
        tail = torch.tensor([[tok.encode(" of")[0], tok.eot_id]])
        return torch.cat([prompt_BT.cpu(), tail], dim=1)

    monkeypatch.setattr(braid.generate, "generate", fake_generate)
    argv = ["generate", "--run", str(run), "--prompt", "a mixture", "--cpu"]
    assert main(argv + ["--through-eot"] * through) == 0
    text = capsys.readouterr().out.rstrip("\n")
    assert seen["stop"] == (None if through else tok.eot_id)
    ids = tok.encode("a mixture") + tok.encode(" of")
    assert text == tok.decode(ids + [tok.eot_id] * through)
