"""Whole-model helpers of `test_exchange_ranks.py` (run inside its spawned ranks): the small
model as the trainer builds it, the exchange and overlap settings it runs with, and one run of it
on a rank."""

from __future__ import annotations

import contextlib
import io

import torch
import torch.nn.functional as F

from harness import SMALL_MODEL

MODEL = [  # a small model as the trainer builds it: 3 MoE layers over ep=4
    *SMALL_MODEL,
    "--moe.first_k_dense=0",
    "--parallel.ep=4",
]
HIER_N2 = ["--exchange.algorithm=hierarchical", "--exchange.node_size=2"]
ON = {"chunks": 2, "split_dw": True}
MODELS = {  # name -> ([exchange] overrides, [overlap] settings)
    "nccl": ([], {}),
    "hier-n2": (HIER_N2, ON),
    "auto": (["--exchange.algorithm=auto", "--exchange.node_size=2"], ON),
    # The report times every exchange through its handle (this crashed on the two-stage handle).
    "hier-n2-report": (HIER_N2, {"report": True}),
    "hier-n2-auto-report": (
        HIER_N2,
        {"chunks": "auto", "split_dw": True, "report": True, "max_chunks": 4},
    ),
}


def _model_run(name: str, rank: int, world: int) -> dict:
    """Two forward+backward passes of the model `name` on this rank's tokens: loss, local grads,
    the distinct exchange objects of its MoE layers, what stderr got and the watcher's records."""
    from braid.config import load_config
    from braid.overlap.config import OverlapConfig
    from braid.overlap.session import OverlapSession
    from braid.parallel.distributed import init_distributed
    from braid.parallel.expert import watch_exchange_choice
    from braid.train.model_setup import build_model

    overrides, overlap = MODELS[name]
    cfg = load_config(None, MODEL + overrides)
    ctx = init_distributed(cfg)
    model = build_model(cfg, ctx)
    records: list = []
    watch_exchange_choice(model, records.append)
    session = OverlapSession.install(
        model,
        OverlapConfig(**overlap),
        device=ctx.device,
        tokens_per_rank=2 * 16,
        dtype=torch.float32,
        is_main=rank == 0,
        log=lambda line: None,
    )
    data = torch.randint(0, 128, (2 * world, 17), generator=torch.Generator().manual_seed(5))
    tokens = data[2 * rank : 2 * rank + 2]
    err, losses = io.StringIO(), []
    session.begin_step(1)  # a log step: timed when the report is on
    with contextlib.redirect_stderr(err):
        for _ in range(2):  # two passes: the choice is made (and reported) at the first only
            out = model(tokens[:, :-1])
            ce = F.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
            (ce + 0.01 * out.aux_loss).backward()
            losses.append(float(ce))
    session.flush()
    metrics = session.end_step(1)
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad
        grads[n] = (g.to_local() if hasattr(g, "to_local") else g).clone()
    moes = model.moe_modules().values()
    return {
        "losses": losses,
        "grads": grads,
        "num_moe": len(moes),
        "exchanges": len({id(m.dispatcher.exchange) for m in moes}),
        "exchange_type": type(next(iter(moes)).dispatcher.exchange).__name__,
        "overlap": [m.overlap is not None and m.overlap.chunks for m in moes],
        "stderr": err.getvalue(),
        "records": [(r.record(), r.line(), r.metrics()) for r in records],
        "metrics": metrics,
    }
