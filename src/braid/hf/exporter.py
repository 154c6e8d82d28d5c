"""`braid export --format hf`: a Braid model as a Hugging Face checkpoint directory.

Steps:
  1. the model and config of a run, a checkpoint or a Braid model directory (one process, CPU);
  2. the architecture: `--arch`, or the one adapter whose `hf_config` accepts the config;
     a config no architecture computes exactly is refused with the setting that prevents it;
  3. HF tensors from the adapter's specs (the inverse transforms of import), in `--dtype`;
     Braid tensors with no HF slot (a routing bias where the router has none) must be zero;
  4. shards of at most `--max-shard-size` bytes (one file when everything fits, else
     model-0000i-of-0000n.safetensors + model.safetensors.index.json), config.json,
     tokenizer.json and tokenizer_config.json, all in a temporary sibling renamed into place.
`transformers.AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)`
load the result with nothing missing or unexpected.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from torch import Tensor

from braid.config import Config
from braid.errors import BraidError
from braid.hf.base import HFRefusal
from braid.hf.files import INDEX, SINGLE
from braid.hf.registry import adapter_by_arch, auto_adapter

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in UNITS or float(m.group(1)) <= 0:
        raise BraidError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def load_braid(path: Path) -> tuple[torch.nn.Module, Config, Path]:
    """(model, config, tokenizer.json) of a run, checkpoint or Braid model directory."""
    from braid.checkpoint import paths
    from braid.checkpoint.load import (
        TOKENIZER_FILE,
        WEIGHTS_FILE,
        find_checkpoint,
        load_checkpoint_model,
        load_export,
        read_export_config,
    )

    device = torch.device("cpu")
    if (path / WEIGHTS_FILE).is_file():
        return load_export(path, device), read_export_config(path), path / TOKENIZER_FILE
    ckpt = find_checkpoint(path)
    model, cfg = load_checkpoint_model(ckpt, device)
    return model, cfg, paths.tokenizer_of(ckpt)


def hf_tensors(
    model: torch.nn.Module, cfg: Config, adapter, dtype: torch.dtype
) -> dict[str, Tensor]:
    """Every HF tensor of `model` under `adapter`'s key map (step 3)."""
    sd = model.state_dict()
    for name, why in adapter.zero_tensors(cfg).items():
        if name in sd and bool(sd[name].any()):
            raise HFRefusal(
                f"{name} is non-zero (the aux-loss-free routing bias, "
                f"moe.bias_balance) and {adapter.architecture} has no place for "
                f"it ({why}); export to an architecture with a routing bias"
            )
    out: dict[str, Tensor] = {}
    for spec in adapter.specs(cfg):
        for key, t in zip(spec.hf, spec.to_hf(sd[spec.braid].detach()), strict=True):
            out[key] = t.to(dtype).contiguous()
    return out


def shard(tensors: dict[str, Tensor], limit: int) -> list[dict[str, Tensor]]:
    """Greedy shards in key order, each at most `limit` bytes (a bigger tensor goes alone)."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += n
    return shards


def export_hf(
    run: str | Path,
    out: str | Path,
    arch: str | None = None,
    dtype: str = "bf16",
    max_shard_size: str = "5GB",
) -> Path:
    from safetensors.torch import save_file
    from tqdm import tqdm

    from braid.checkpoint.state import plain_mode
    from braid.data.tokenizer import Tok

    run, out = Path(run), Path(out)
    if dtype not in DTYPES:
        raise BraidError(f"--dtype {dtype!r}: expected bf16 or fp32")
    limit = parse_size(max_shard_size)
    model, cfg, tok_path = load_braid(run)
    if not tok_path.is_file():
        raise BraidError(f"{tok_path} is missing: copy the tokenizer.json used for training there")
    adapter = adapter_by_arch(arch) if arch else auto_adapter(cfg)
    config = adapter.hf_config(cfg)
    tok = Tok.from_file(tok_path)
    eot = tok.tokenizer.id_to_token(tok.eot_id)
    config.update(
        dtype="bfloat16" if dtype == "bf16" else "float32",
        eos_token_id=tok.eot_id,
        bos_token_id=None,
        pad_token_id=None,
    )
    tensors = hf_tensors(model, cfg, adapter, DTYPES[dtype])
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        parts = shard(tensors, limit)
        if len(parts) == 1:
            save_file(parts[0], tmp / SINGLE, metadata={"format": "pt"})
            plain_mode(tmp / SINGLE)
        else:
            weight_map = {}
            # a bar over the shards on a terminal only (disable=None): a large model takes minutes
            bar = tqdm(parts, desc="shards", unit="shard", disable=None, leave=False)
            for i, part in enumerate(bar, start=1):
                name = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
                save_file(part, tmp / name, metadata={"format": "pt"})
                plain_mode(tmp / name)
                weight_map.update(dict.fromkeys(part, name))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            _write_json(tmp / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        _write_json(tmp / "config.json", config)
        shutil.copyfile(tok_path, tmp / "tokenizer.json")
        _write_json(
            tmp / "tokenizer_config.json",
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": eot,
                "model_max_length": cfg.model.max_seq_len,
                "clean_up_tokenization_spaces": False,
            },
        )
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        from braid.checkpoint.export import install

        install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_json(path: Path, body: dict) -> None:
    path.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")


_OWN = re.compile(
    r"(model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|"
    r"config\.json|tokenizer\.json|tokenizer_config\.json)"
)


def _check_target(out: Path) -> None:
    """`out` may be missing, empty or an earlier HF export (replaced whole); nothing else."""
    if out.exists() and not out.is_dir():
        raise BraidError(f"--out {out} is a file: give a directory path")
    if out.is_dir():
        names = [p.name for p in out.iterdir()]
        if names and not ("config.json" in names and all(_OWN.fullmatch(n) for n in names)):
            raise BraidError(
                f"--out {out} is a non-empty directory that is not an HF export: "
                "give a new or empty directory"
            )
