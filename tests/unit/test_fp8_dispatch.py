"""The fp8 dispatch (quantise per token, gather codes) gives the experts exactly the codes they
would compute themselves from the bf16 copies: a whole MoE layer's output and every gradient
are bitwise equal with and without it (one process; tests/distributed/test_fp8_ep.py covers
the exchange)."""

import torch

from braid.config import load_config
from braid.model.init import init_weights
from braid.model.transformer import Transformer
from braid.parallel.fp8 import apply_fp8

SMALL = [
    "--model.dim=32",
    "--model.n_layers=2",
    "--model.n_heads=2",
    "--model.vocab_size=64",
    "--moe.expert_hidden=16",
    "--moe.num_experts=4",
    "--moe.top_k=2",
    "--moe.num_shared_experts=1",
]


def test_fp8_dispatch_equals_local_quantisation_bitwise():
    results = []
    for send in (True, False):
        cfg = load_config(None, SMALL)
        model = Transformer(cfg.model, cfg.moe)
        init_weights(model, 0, cfg.model.init_std, cfg.model.n_layers)
        apply_fp8(model, cfg.train.fp8_skip, torch.device("cpu"))
        moe = model.blocks[1].ffn
        if not send:
            moe.dispatcher.send_fp8 = None
        calls = []
        real = moe.experts._forward_fp8
        moe.experts._forward_fp8 = lambda x, *a, c=calls, f=real: (
            c.append(type(x).__name__),
            f(x, *a),
        )[1]
        x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y, _ = moe(x)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2)))
        assert calls == (["Fp8Rows"] if send else ["Tensor"])
        stats = model.fp8_stats.read()
        assert stats == {}  # recorded only while active
        model.fp8_stats.active = True
        moe(x)
        got = model.fp8_stats.read()
        assert got["fp8/blocks.1.ffn.experts.w13/x/amax"] == x.abs().max().item()
        results.append(got)
        results.append([y, x.grad] + [p.grad for p in moe.parameters()])
    stats_send, stats_local = results.pop(0), results.pop(1)
    assert stats_send.keys() == stats_local.keys() and stats_send == stats_local
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_chunked_path_gives_the_experts_the_fp8_dispatch_codes():
    """Under bf16 autocast with an fp32 residual, the chunked path (overlap engine, one chunk)
    sends rows in x's dtype and the experts quantise them to the codes the plain path's fp8
    dispatch sends: the layer's output is bitwise the same (a bf16 round trip first would
    change a few percent of the codes)."""
    from braid.overlap.engine import LayerOverlap
    from braid.overlap.streams import Clock

    cfg = load_config(None, SMALL)
    model = Transformer(cfg.model, cfg.moe)
    init_weights(model, 0, cfg.model.init_std, cfg.model.n_layers)
    apply_fp8(model, cfg.train.fp8_skip, torch.device("cpu"))
    moe = model.blocks[1].ffn
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(3)) * 3
    outs = []
    for overlap in (None, LayerOverlap(0, 1, False, Clock(torch.device("cpu")))):
        moe.overlap = overlap
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(moe(x)[0])
    assert torch.equal(outs[0], outs[1])
