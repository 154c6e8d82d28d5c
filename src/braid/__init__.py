"""Braid: Mixture-of-Experts training on PyTorch, with expert parallelism and overlap."""

__version__ = "0.1.0"


def load(path, device="cpu"):
    """(model, tokenizer) from a Braid model, run or checkpoint directory or an HF checkpoint;
    `model(ids_BT)` returns logits [B, T, V] (see braid.inference)."""
    from braid.inference import load as _load

    return _load(path, device)
