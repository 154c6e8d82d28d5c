"""`braid export`: a run's newest checkpoint as one safetensors file, its config and tokenizer
(or a model directory, an export or an import, written again after its checksums are checked).

Output directory (written into a hidden temporary sibling, then renamed into place):
  model.safetensors   every persistent tensor of the single-process model, full (consolidated
                      from any (dp, ep) layout; routed experts as [num_experts, ...]), under the
                      names `Transformer.state_dict()` uses; header metadata: step, fingerprint
  config.json         {"fingerprint", "config", "step", "hashes"}: the resolved config the run
                      trained with and the blake2b-128 hashes of the two other files (checked
                      by every reader, braid.checkpoint.integrity)
  tokenizer.json      copied from the run directory
`out` may be missing, empty or a previous export (replaced: old renamed aside, new renamed in,
old deleted); any other non-empty directory is refused so a typo cannot delete files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from braid.checkpoint import paths
from braid.checkpoint.integrity import hash_files
from braid.checkpoint.load import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    find_checkpoint,
    load_checkpoint_model,
    load_model_dir,
)
from braid.checkpoint.meta import read_meta
from braid.checkpoint.state import fsync_dir, plain_mode, write_json_durable
from braid.errors import BraidError

_EXPORT_FILES = {WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE, "model.toml"}


def export(run: Path, out: Path) -> Path:
    """Export the newest checkpoint of `run` (or the checkpoint `run` names) into `out`; a
    model directory (an export or an import) is written again, after its checks."""
    run, out = Path(run), Path(out)
    if (run / WEIGHTS_FILE).is_file():
        tok, step = run / TOKENIZER_FILE, None
    else:
        ckpt = find_checkpoint(run)
        tok, step = paths.tokenizer_of(ckpt), read_meta(ckpt)["step"]
    if not tok.is_file():
        raise BraidError(
            f"{tok} is missing: the run directory lost its tokenizer; copy the "
            "tokenizer.json used for training there and export again"
        )
    check_target(out)
    if step is None:
        model, cfg, body = load_model_dir(run, torch.device("cpu"))
        step = body.get("step")
        step = step if isinstance(step, int) else 0  # an import's, or an older export's
    else:
        model, cfg = load_checkpoint_model(ckpt, torch.device("cpu"))
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}

    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(
            tensors,
            tmp / WEIGHTS_FILE,
            metadata={"format": "pt", "step": str(step), "fingerprint": cfg.fingerprint()},
        )
        plain_mode(tmp / WEIGHTS_FILE)
        shutil.copyfile(tok, tmp / TOKENIZER_FILE)
        for name in (WEIGHTS_FILE, TOKENIZER_FILE):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        hashes = hash_files(tmp, (WEIGHTS_FILE, TOKENIZER_FILE))  # after the data, as written
        write_json_durable(
            tmp / CONFIG_FILE,
            {
                "fingerprint": cfg.fingerprint(),
                "config": cfg.to_dict(),
                "step": step,
                "hashes": hashes,
            },
            indent=2,
        )
        install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise BraidError(f"--out {out} is a file: give a directory path")
    if out.is_dir():
        names = {p.name for p in out.iterdir()}
        if names and not (WEIGHTS_FILE in names and names <= _EXPORT_FILES):
            raise BraidError(
                f"--out {out} is a non-empty directory that is not a braid export: "
                "give a new or empty directory"
            )


def install(tmp: Path, out: Path) -> None:
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)
