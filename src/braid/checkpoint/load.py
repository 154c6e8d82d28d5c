"""A single-process model for inference, from a run, a checkpoint, or an export directory.

`load_for_inference(path, device) -> (model, tokenizer_path)` accepts:
  * an export directory (model.safetensors + config.json + tokenizer.json, see
    braid.checkpoint.export): weights read with safetensors, which cannot run code;
  * a run directory (its newest complete checkpoint) or a checkpoints/step_XXXXXXXX directory:
    the model tensors read through DCP into a one-process model, whatever (dp, ep) layout wrote
    them (braid.checkpoint.storage reads DCP metadata without unpickling arbitrary objects).
The model is built from the config saved with the weights, never from the caller's config, and
returned in eval mode. Every bad input is a one-line BraidError.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from braid.checkpoint import paths
from braid.checkpoint.integrity import DamagedFile, verify_files
from braid.checkpoint.meta import config_of, read_meta, verify_checkpoint
from braid.checkpoint.state import read_json
from braid.checkpoint.storage import load_tensors
from braid.config import Config, config_from_data
from braid.errors import BraidError
from braid.model.transformer import Transformer
from braid.parallel.mesh import ParallelContext

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
_HASHED = (WEIGHTS_FILE, TOKENIZER_FILE)  # the files an export's config.json keeps hashes of


def load_for_inference(path: str | Path, device: torch.device) -> tuple[Transformer, Path]:
    """(model on `device` in eval mode, its tokenizer.json) from an export, run or checkpoint."""
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file():
        model = load_export(path, device)
        tok = path / TOKENIZER_FILE
    else:
        ckpt = find_checkpoint(path)
        model, _ = load_checkpoint_model(ckpt, device)
        tok = paths.tokenizer_of(ckpt)
    if not tok.is_file():
        raise BraidError(
            f"{tok} is missing: a run directory keeps the tokenizer of its data; "
            "copy the tokenizer.json used for training there"
        )
    bad = next(
        (
            n
            for n, t in model.state_dict().items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())
        ),
        None,
    )
    if bad is not None:
        raise BraidError(
            f"{path}: weight {bad} holds NaN or infinite values, so the model "
            "cannot generate: use a checkpoint from before the values diverged"
        )
    return model, tok


def find_checkpoint(path: Path) -> Path:
    """The checkpoint a user-given path means: itself, or the newest one of a run directory."""
    if not path.exists():
        raise BraidError(
            f"{path} does not exist: give a run directory, a checkpoint directory "
            "or an export directory"
        )
    if paths.is_checkpoint(path):
        return path
    newest = paths.latest(path)
    if newest is None:
        raise BraidError(
            f"{path} holds no complete checkpoint and no {WEIGHTS_FILE}: train "
            "first (checkpoints are written at the end of a run), or give an "
            "export directory"
        )
    return newest


def build_single(cfg: Config, device: torch.device) -> Transformer:
    """The one-process model of `cfg` on `device`, allocated but not initialised. It runs
    without an exchange (the default section: one process builds none), so nothing a saved
    config names as a plug-in is looked up."""
    from braid.exchange.config import ExchangeConfig
    from braid.parallel.build import build_model

    cfg = cfg.replace(
        train={"compile": False, "cuda_graphs": False},
        parallel={"activation_checkpoint": False},
        exchange=ExchangeConfig(),
    )
    ctx = ParallelContext(rank=0, world=1, local_rank=0, device=device)
    return build_model(cfg, ctx, init=False)


def load_checkpoint_model(ckpt: Path, device: torch.device) -> tuple[Transformer, Config]:
    """(model in eval mode, its config) with the weights of a DCP checkpoint, full tensors."""
    try:
        meta = read_meta(ckpt)
        verify_checkpoint(ckpt, meta)
    except DamagedFile as e:  # advice for a reader (generate, export), not for a resume
        older = [p for _, p in paths.complete_checkpoints(paths.run_of(ckpt)) if p != ckpt]
        advice = (
            f"give an intact one, e.g. --run {older[-1]}"
            if older
            else "no other checkpoint of this run is complete"
        )
        raise BraidError(f"{e.finding()}; {advice}") from None
    cfg = config_of(meta, ckpt)
    model = build_single(cfg, device)
    sd = get_model_state_dict(model)
    load_tensors({"model": sd}, ckpt, distributed=False)
    set_model_state_dict(model, sd)
    return model.eval(), cfg


def read_export_config(path: Path, verify: bool = False) -> Config:
    """The config of a model directory (export or import); with `verify`, its weights and
    tokenizer are first checked against the hashes its config.json keeps."""
    body, cfg = _read_export_body(path)
    if verify:
        _verify(path, body)
    return cfg


def _verify(path: Path, body: dict) -> None:
    """Check the files of a model directory against its hashes (directories written before
    hashes existed have none and are read unchecked)."""
    hashes = body.get("hashes")
    if hashes is None:
        return
    if not isinstance(hashes, dict) or WEIGHTS_FILE not in hashes:
        raise BraidError(
            f"{Path(path) / CONFIG_FILE} has bad 'hashes': the file was altered; "
            "write the directory again (braid export or braid import)"
        )
    verify_files(
        path,
        hashes,
        [n for n in hashes if n in _HASHED],
        "model directory",
        "write it again (braid export or braid import)",
    )


def _read_export_body(path: Path) -> tuple[dict, Config]:
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise BraidError(
            f"{file} is missing: an export directory holds {WEIGHTS_FILE}, "
            f"{CONFIG_FILE} and {TOKENIZER_FILE}; re-run braid export"
        )
    body = read_json(file, "export config", "re-run braid export")
    if not isinstance(body, dict):
        raise BraidError(f"{file} is corrupt (not a JSON object); re-run braid export")
    if "config" not in body and "model_type" in body:
        raise BraidError(
            f"{path} is a Hugging Face checkpoint, not a Braid model directory: convert it "
            "first with braid import"
        )
    return body, config_from_data(body.get("config"), body.get("fingerprint"), file)


def load_export(path: Path, device: torch.device) -> Transformer:
    """The model of an export directory, in eval mode; its files checked against the hashes
    in config.json first (exports written before hashes existed are loaded unchecked)."""
    return load_model_dir(path, device)[0]


def load_model_dir(path: Path, device: torch.device) -> tuple[Transformer, Config, dict]:
    """(model in eval mode, its config, config.json's body) of a model directory (an export or
    an import), checked as `load_export` says."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    body, cfg = _read_export_body(path)
    _verify(path, body)
    model = build_single(cfg, device)
    file = Path(path) / WEIGHTS_FILE
    try:
        sd = load_file(file, device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise BraidError(
            f"{file} is corrupt or truncated ({_one_line(e)}); re-run braid export"
        ) from None
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise BraidError(
            f"{file} does not match the model of {path / CONFIG_FILE} "
            f"({_one_line(e)}); re-run braid export"
        ) from None
    return model.eval(), cfg, body


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines)[:200] if lines else type(e).__name__
