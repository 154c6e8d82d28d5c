"""Training steps from the trainer's own pieces, for the tests that take them on gloo ranks with
the overlap engine on and off: the model as the trainer builds it (build_model: parallelize,
then init), its optimizer and the overlap session over it; and this rank's part of every
gradient, compared between two runs.
"""

from __future__ import annotations

import numpy as np
import torch


def overlap_trainer(cfg, ctx) -> tuple:
    """(model, optimizer, overlap session, autocast context, this rank's rows of a batch): the
    batch is cfg.train.batch_size sequences split evenly over the world; the session is installed
    for fp32 and logs nothing (is_main False)."""
    from braid.overlap.session import OverlapSession
    from braid.train.model_setup import build_model
    from braid.train.optim import build_optimizer
    from braid.train.trainer import autocast

    model = build_model(cfg, ctx)
    opt = build_optimizer(model, cfg.train, ctx.device)
    b, amp = cfg.train.batch_size // ctx.world, autocast(cfg, ctx.device)
    session = OverlapSession.install(
        model,
        cfg.overlap,
        device=ctx.device,
        dtype=torch.float32,
        tokens_per_rank=b * cfg.train.seq_len,
        is_main=False,
    )
    return model, opt, session, amp, b


def local_grads(model) -> dict[str, np.ndarray | None]:
    """This rank's block of every parameter's gradient (a DTensor's local part), as fp32 numpy
    copies (by value through the result queue); None where a parameter has no gradient."""
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        grads[n] = None if g is None else g.detach().float().numpy().copy()
    return grads


def grad_errors(got: dict, ref: dict) -> dict[str, float]:
    """Relative (Frobenius) error of `got`'s gradient of each parameter of `ref`: 0 where both
    have none, inf where only one has one."""
    errs = {}
    for n, r in ref.items():
        g = got[n]
        if g is None or r is None:
            errs[n] = 0.0 if g is None and r is None else float("inf")
            continue
        errs[n] = float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30))
    return errs
