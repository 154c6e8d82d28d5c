"""`braid import HF_DIR --out DIR`: a Hugging Face checkpoint as a Braid model directory.

Steps:
  1. config.json -> the adapter of its model_type -> Braid [model]/[moe] knobs (every setting
     allowlisted, anything Braid cannot compute exactly refused in one line);
  2. plan: the Braid model's tensors (built on the meta device) against the adapter's specs
     and the checkpoint's headers: every spec's HF tensors present with the shapes the
     transform maps onto the Braid shape, and no HF tensor left over (refused, named);
  3. convert one Braid tensor at a time (its HF tensors read, transformed, written, dropped)
     into one streamed model.safetensors, so memory stays near the largest stacked tensor;
  4. config.json (the Braid config), model.toml ([model] and [moe], for `braid train` with
     checkpoint.init_from) and the tokenizer, all in a temporary sibling renamed into place.
The output is what `braid export` writes, so generate, braid.load and init_from accept it.
Sources may be fp32, bf16 or fp16 and keep their dtype.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from braid.config import Config, from_dict
from braid.errors import BraidError
from braid.hf.base import Adapter, HFConfig, HFRefusal, Spec
from braid.hf.files import HFCheckpoint, read_json, write_streaming
from braid.hf.registry import adapter_for

FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
FP8 = "F8_E4M3"


def read_hf_config(hf_dir: Path, keys: set[str]) -> tuple[Adapter, Config, dict]:
    """(adapter, Braid config, raw config.json) of an HF checkpoint directory whose tensors
    are named `keys` (step 1)."""
    raw = read_json(Path(hf_dir) / "config.json", "an HF checkpoint directory has config.json")
    where = str(Path(hf_dir) / "config.json")
    adapter = adapter_for(str(raw.get("model_type")), where)
    hf = HFConfig(raw, where)
    hf.keys = keys
    sections = adapter.braid_sections(hf)
    hf.finish()
    max_len = sections["model"]["max_seq_len"]
    sections["train"] = {"seq_len": min(128, max_len)}
    try:
        cfg = from_dict(sections).validate()
    except BraidError as e:
        raise HFRefusal(f"{where} maps to a Braid config braid rejects: {e}") from None
    return adapter, cfg, raw


class Plan:
    """The checked mapping of one checkpoint onto one Braid model (step 2)."""

    def __init__(self, adapter: Adapter, cfg: Config, ckpt: HFCheckpoint):
        from braid.model.transformer import Transformer

        self.adapter, self.cfg, self.ckpt = adapter, cfg, ckpt
        self.fp8_block: tuple[int, int] | None = getattr(adapter, "fp8_block", None)
        with torch.device("meta"):
            model = Transformer(cfg.model, cfg.moe)
        self.shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        specs = adapter.specs(cfg)
        self.zero = adapter.zero_tensors(cfg)
        by_name = {s.braid: s for s in specs}
        unknown = sorted(set(by_name) - set(self.shapes))
        missing = sorted(set(self.shapes) - set(by_name) - set(self.zero))
        if unknown or missing:  # an adapter bug, not a user error
            raise AssertionError(
                f"adapter {adapter.model_type}: specs for {unknown[:3]}, none for {missing[:3]}"
            )
        used: set[str] = set()
        self.specs: list[Spec] = []
        self.dtypes: dict[str, torch.dtype] = {}
        for name in self.shapes:  # model order: layer by layer, close to shard order
            if name in self.zero:
                continue
            spec = by_name[name]
            self._check(spec)
            used.update(spec.hf)
            self.specs.append(spec)
        left = sorted(k for k in ckpt.shape if k not in used and not adapter.ignored(k, cfg))
        if left:
            raise HFRefusal(
                f"{ckpt.root}: tensor {left[0]} (and {len(left) - 1} more) has no "
                f"place in the Braid model of model_type {adapter.model_type}"
            )

    def _check(self, spec: Spec) -> None:
        ck = self.ckpt
        for k in spec.hf:
            if k not in ck.shape:
                raise HFRefusal(
                    f"{ck.root} lacks tensor {k}, which model_type "
                    f"{self.adapter.model_type} with this config.json needs"
                )
            if ck.dtype[k] == FP8 and self.fp8_block is not None:
                self._check_scale(k)
            elif ck.dtype[k] not in FLOATS:
                raise HFRefusal(
                    f"{ck.root}: tensor {k} is {ck.dtype[k]}; braid imports F32, BF16 and "
                    "F16 weights (and DeepSeek's block-scaled fp8)"
                )
        want = [t.shape for t in spec.to_hf(torch.empty(self.shapes[spec.braid], device="meta"))]
        for k, shape in zip(spec.hf, want, strict=True):
            if tuple(ck.shape[k]) != tuple(shape):
                raise HFRefusal(
                    f"{ck.root}: tensor {k} has shape {list(ck.shape[k])}, but "
                    f"config.json implies {list(shape)}"
                )
        kinds = {"BF16" if ck.dtype[k] == FP8 else ck.dtype[k] for k in spec.hf}
        self.dtypes[spec.braid] = FLOATS[kinds.pop()] if len(kinds) == 1 else torch.float32

    def _check_scale(self, key: str) -> None:
        """An fp8 weight needs its per-block inverse scales, one per (rows, cols) block."""
        ck, (br, bc) = self.ckpt, self.fp8_block
        scale = f"{key}_scale_inv"
        rows, cols = ck.shape[key]
        want = (-(-rows // br), -(-cols // bc))
        if scale not in ck.shape or tuple(ck.shape[scale]) != want:
            raise HFRefusal(f"{ck.root}: fp8 tensor {key} needs {scale} of shape {list(want)}")

    def _read(self, keys: tuple[str, ...]) -> list[Tensor]:
        """The tensors `keys`; fp8 ones dequantized blockwise (w * scale_inv) into bf16, as
        DeepSeek's own fp8-to-bf16 conversion does."""
        fp8 = [k for k in keys if self.ckpt.dtype[k] == FP8]
        got = self.ckpt.read([*keys, *(f"{k}_scale_inv" for k in fp8)])
        out, scales = got[: len(keys)], dict(zip(fp8, got[len(keys) :], strict=True))
        for i, k in enumerate(keys):
            if k in scales:
                br, bc = self.fp8_block
                s = scales[k].float().repeat_interleave(br, 0).repeat_interleave(bc, 1)
                w = out[i].float()
                out[i] = (w * s[: w.shape[0], : w.shape[1]]).to(torch.bfloat16)
        return out

    def tensor(self, spec: Spec) -> Tensor:
        dtype = self.dtypes[spec.braid]
        return spec.to_braid([t.to(dtype) for t in self._read(spec.hf)]).contiguous()

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        """(Braid name, tensor) one at a time, zero-filled slots included (step 3)."""
        for spec in self.specs:
            yield spec.braid, self.tensor(spec)
        for name in self.zero:
            yield name, torch.zeros(self.shapes[name])


def open_hf(hf_dir: Path) -> Plan:
    raw = read_json(Path(hf_dir) / "config.json", "an HF checkpoint directory has config.json")
    adapter_for(str(raw.get("model_type")), str(Path(hf_dir) / "config.json"))  # fail early
    ckpt = HFCheckpoint(Path(hf_dir))
    adapter, cfg, _ = read_hf_config(hf_dir, set(ckpt.shape))
    return Plan(adapter, cfg, ckpt)


def import_hf(hf_dir: str | Path, out: str | Path) -> Path:
    """Convert the checkpoint in `hf_dir` into the Braid model directory `out`."""
    from braid.checkpoint.export import check_target, install
    from braid.checkpoint.integrity import hash_files
    from braid.checkpoint.load import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE
    from braid.checkpoint.state import write_json_durable
    from braid.config import to_toml

    hf_dir, out = Path(hf_dir), Path(out)
    if not hf_dir.is_dir():
        raise HFRefusal(f"{hf_dir} is not a directory: give an HF checkpoint directory")
    plan = open_hf(hf_dir)
    tok = hf_dir / TOKENIZER_FILE
    if not tok.is_file():
        raise HFRefusal(
            f"{tok} is missing: braid needs the fast-tokenizer file tokenizer.json "
            "(save the tokenizer with transformers to get one)"
        )
    _check_tokenizer(tok, plan.cfg)
    check_target(out)
    cfg = plan.cfg
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        entries = [(s.braid, plan.shapes[s.braid], plan.dtypes[s.braid]) for s in plan.specs]
        entries += [(n, plan.shapes[n], torch.float32) for n in plan.zero]
        specs = plan.specs

        def make(i: int) -> Tensor:
            return plan.tensor(specs[i]) if i < len(specs) else torch.zeros(entries[i][1])

        write_streaming(
            tmp / WEIGHTS_FILE,
            entries,
            make,
            {
                "format": "pt",
                "step": "0",
                "fingerprint": cfg.fingerprint(),
                "source": f"hf:{plan.adapter.model_type}",
            },
        )
        (tmp / "model.toml").write_text(_model_toml(to_toml(cfg)))
        shutil.copyfile(tok, tmp / TOKENIZER_FILE)
        write_json_durable(
            tmp / CONFIG_FILE,
            {
                "fingerprint": cfg.fingerprint(),
                "config": cfg.to_dict(),
                "step": 0,
                "source": {"format": "hf", "model_type": plan.adapter.model_type},
                # after the data, as written: every reader checks them (braid.checkpoint)
                "hashes": hash_files(tmp, (WEIGHTS_FILE, TOKENIZER_FILE)),
            },
            indent=2,
        )
        install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_tokenizer(tok: Path, cfg: Config) -> None:
    from braid.data.tokenizer import Tok

    t = Tok.from_file(tok)
    if t.vocab_size > cfg.model.vocab_size:
        raise HFRefusal(
            f"{tok} emits ids up to {t.vocab_size - 1} but config.json has "
            f"vocab_size={cfg.model.vocab_size}"
        )


def _model_toml(full: str) -> str:
    """Only the [model] and [moe] sections: what a fine-tuning run must keep to load the
    weights; everything else stays the user's choice."""
    keep, out = (
        False,
        [
            "# The model of this directory: braid train model.toml "
            "--checkpoint.init_from=<this directory> ..."
        ],
    )
    for line in full.splitlines():
        if line.startswith("["):
            keep = line.strip() in ("[model]", "[moe]")
        if keep:
            out.append(line)
    return "\n".join(out) + "\n"
