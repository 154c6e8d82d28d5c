"""`braid.load(path, device)`: a model and its tokenizer for use from Python.

`path` may be a Braid model directory (`braid import` or `braid export`), a run directory (its
newest checkpoint), a checkpoint directory, or a Hugging Face checkpoint directory of a
supported architecture (converted in memory, as `braid import` would convert it). The model is
in eval mode on `device`; calling it on token ids [B, T] returns logits [B, T, V].
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from braid.data.tokenizer import Tok
from braid.model.transformer import Transformer


class CausalLM(nn.Module):
    """A Braid transformer whose call returns only the logits; `.transformer` is the model."""

    def __init__(self, transformer: Transformer):
        super().__init__()
        self.transformer = transformer
        self.cfg = transformer.cfg

    def forward(self, idx_BT: Tensor) -> Tensor:
        return self.transformer(idx_BT).logits


class Loaded(NamedTuple):
    model: CausalLM
    tokenizer: Tok


def load(path: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """(model, tokenizer) from a Braid model/run/checkpoint directory or an HF checkpoint."""
    import json

    from braid.checkpoint.load import build_single, load_for_inference

    path, device = Path(path), torch.device(device)
    cfg_file = path / "config.json"
    is_hf = False
    if cfg_file.is_file():
        try:
            is_hf = "model_type" in json.loads(cfg_file.read_text())
        except ValueError:
            is_hf = False
    if is_hf:
        from braid.hf.importer import open_hf

        plan = open_hf(path)
        model = build_single(plan.cfg, device)
        model.load_state_dict(dict(plan.tensors()), strict=True)
        model.eval()
        tok = path / "tokenizer.json"
    else:
        model, tok = load_for_inference(path, device)
    return Loaded(CausalLM(model).eval(), Tok.from_file(tok))
