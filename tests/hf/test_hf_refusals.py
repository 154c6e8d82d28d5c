"""Refusals: every HF setting, file or tensor Braid cannot convert exactly, and every Braid model
no HF architecture computes, ends `braid import` / `braid export --format hf` with one line and
exit code 2, and nothing is written (no output directory, no temporary sibling)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_hf import BRAID_MODELS, save_braid, save_hf

from braid.cli import main

pytest.importorskip("transformers")


def _config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _index(d: Path, fn) -> None:
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    fn(idx["weight_map"])
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))


def _shard_of(d: Path, key: str) -> Path:
    return d / json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][key]


def _drop_tensor(d: Path, key: str) -> None:
    shard = _shard_of(d, key)
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    _index(d, lambda m: m.pop(key))


def _add_tensor(d: Path, key: str) -> None:
    save_file({key: torch.zeros(4)}, d / "extra.safetensors")
    _index(d, lambda m: m.update({key: "extra.safetensors"}))


def _only_pickle(d: Path) -> None:
    for p in d.glob("model*"):
        p.unlink()
    (d / "pytorch_model.bin").write_bytes(b"not opened")


ROPE = {"rope_theta": 1e6, "rope_type": "linear", "factor": 2.0}
IMPORT_CASES = {  # name: (change to a saved tiny Mixtral, words the one line must contain)
    "unknown_model_type": (lambda d: _config(d, model_type="gpt2"), "model_type='gpt2' is not"),
    "rope_scaling_type": (lambda d: _config(d, rope_parameters=ROPE), "rope_type='linear'"),
    "old_style_rope_scaling": (
        lambda d: _config(d, rope_scaling={"type": "dynamic", "factor": 2.0}),
        "'dynamic'",
    ),
    "sliding_window_where_unsupported": (
        lambda d: _config(d, model_type="qwen3_moe", use_sliding_window=True, sliding_window=16),
        "sliding_window=16",
    ),
    "unknown_layer_type": (
        lambda d: _config(d, layer_types=["full_attention", "chunked_attention"]),
        "chunked_attention",
    ),
    "attention_sinks": (lambda d: _config(d, attention_sinks=True), "attention_sinks=True"),
    "activation": (lambda d: _config(d, hidden_act="gelu"), "hidden_act='gelu'"),
    "index_path_traversal": (
        lambda d: _index(d, lambda m: m.update({"model.norm.weight": "../x.safetensors"})),
        "'../x.safetensors'",
    ),
    "index_absolute_path": (
        lambda d: _index(d, lambda m: m.update({"model.norm.weight": "/etc/x.safetensors"})),
        "'/etc/x.safetensors'",
    ),
    "pickled_weights_only": (_only_pickle, "pytorch_model.bin is pickled"),
    "missing_tensor": (
        lambda d: _drop_tensor(d, "model.layers.1.self_attn.k_proj.weight"),
        "lacks tensor model.layers.1.self_attn.k_proj.weight",
    ),
    "unexpected_tensor": (
        lambda d: _add_tensor(d, "model.layers.0.self_attn.sinks"),
        "tensor model.layers.0.self_attn.sinks",
    ),
    "wrong_shape": (lambda d: _config(d, num_key_value_heads=4), "k_proj.weight has shape"),
    # JSON of the wrong type: refused by name, never truncated, parsed or coerced
    "fractional_int": (
        lambda d: _config(d, num_hidden_layers=2.5),
        "num_hidden_layers=2.5 is not supported for model_type mixtral (expected an integer)",
    ),
    "string_int": (lambda d: _config(d, hidden_size="192"), "hidden_size='192'"),
    "string_bool": (
        lambda d: _config(d, tie_word_embeddings="false"),
        "tie_word_embeddings='false' is not supported for model_type mixtral (expected true or",
    ),
    "string_float": (lambda d: _config(d, rms_norm_eps="x"), "rms_norm_eps='x'"),
    "string_theta": (lambda d: _config(d, rope_theta="abc"), "rope_theta='abc'"),
    "required_int_null": (lambda d: _config(d, num_hidden_layers=None), "num_hidden_layers=None"),
    "rope_parameters_not_object": (
        lambda d: _config(d, rope_parameters=5),
        "rope_parameters=5 is not supported for model_type mixtral (expected an object)",
    ),
}


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("refuse") / "hf"
    save_hf("mixtral", d)
    return d


def _refused(argv: list[str], out: Path, capsys, words: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert words in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("case", sorted(IMPORT_CASES))
def test_import_refuses_in_one_line_and_writes_nothing(case, mixtral_dir, tmp_path, capsys):
    change, words = IMPORT_CASES[case]
    d = tmp_path / "hf"
    shutil.copytree(mixtral_dir, d)
    change(d)
    out = tmp_path / "out" / "braid"
    out.parent.mkdir()
    _refused(["import", str(d), "--out", str(out)], out, capsys, words)


EXPORT_CASES = {  # name: (Braid overrides, extra CLI args, words)
    "capacity_dropping": (
        BRAID_MODELS["mixtral"] + ["--moe.capacity_factor=1.25"],
        [],
        "moe.capacity_factor=1.25",
    ),
    "dense_first_layer_as_mixtral": (
        ["--moe.first_k_dense=1"],
        ["--arch", "mixtral"],
        "moe.layers=[1, 2]",
    ),
    "no_architecture_fits": (["--moe.first_k_dense=1"], [], "no Hugging Face architecture"),
    "routing_bias_without_slot": (
        BRAID_MODELS["mixtral"] + ["--moe.bias_balance=true"],
        [],
        "expert_bias is non-zero",
    ),
    "unknown_arch": (BRAID_MODELS["mixtral"], ["--arch", "llama"], "--arch 'llama'"),
    "shard_size": (BRAID_MODELS["mixtral"], ["--max-shard-size", "lots"], "'lots'"),
}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_export_refuses_in_one_line_and_writes_nothing(case, tmp_path, capsys):
    overrides, args, words = EXPORT_CASES[case]
    src = save_braid(overrides, tmp_path / "braid")
    if case == "routing_bias_without_slot":
        sd = load_file(src / "model.safetensors")
        sd["blocks.1.ffn.router.expert_bias"] = torch.tensor([0.0, 0.1, 0.0, 0.0])
        save_file(sd, src / "model.safetensors")
    out = tmp_path / "out"
    _refused(
        ["export", "--run", str(src), "--out", str(out), "--format", "hf", *args],
        out,
        capsys,
        words,
    )


def test_refusal_exit_code_from_the_command_line(mixtral_dir, tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(mixtral_dir, d)
    _config(d, model_type="llama4")
    proc = subprocess.run(
        [sys.executable, "-m", "braid", "import", str(d), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "model_type='llama4' is not supported" in proc.stderr


def test_typed_reads_of_null_follow_transformers():
    """A null flag reads as false (transformers' `if config.key:`), a null optional number as
    its default, a null required integer is refused."""
    from braid.hf.base import HFConfig, HFRefusal

    hf = HFConfig({"norm_topk_prob": None, "rms_norm_eps": None, "vocab_size": None}, "c.json")
    assert hf.flag("norm_topk_prob", True) is False and hf.flag("rope_interleave", True) is True
    assert hf.number("rms_norm_eps", 1e-6) == 1e-6
    with pytest.raises(HFRefusal, match="vocab_size=None"):
        hf.integer("vocab_size")


def test_a_hugging_face_folder_given_as_a_model_directory_says_import_it(tmp_path, capsys):
    hf = tmp_path / "hf"
    save_hf("mixtral", hf, shard="1GB")  # one model.safetensors, as a Braid directory has
    assert (hf / "model.safetensors").is_file()
    for argv in (
        ["export", "--run", str(hf), "--out", str(tmp_path / "x")],
        ["generate", "--run", str(hf), "--prompt", "a", "--cpu"],
    ):
        _refused(argv, tmp_path / "x", capsys, "is a Hugging Face checkpoint, not a Braid model")
