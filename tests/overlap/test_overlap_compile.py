"""The overlap engine inside a compiled block: dynamo leaves it alone.

`train.compile` compiles each block, the MoE layer's forward with it. The engine (streams,
events, host-timed windows, closures per chunk) runs eagerly: `LayerOverlap.run` is one graph
break. Traced instead, its closures became frames of their own, recompiled for every chunk
count the trial tried (their guards hold the count) until dynamo's recompile limit. These
tests compile a layer with the engine installed, change the chunk count as the trial does,
and require results equal to the uncompiled layer and no compiled frame inside the engine.
"""

from __future__ import annotations

import copy

import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from braid.ops.grouped_gemm import _GroupedLinear, grouped_linear
from braid.overlap.engine import LayerOverlap
from braid.overlap.pipeline import Schedule
from braid.overlap.streams import Clock
from small_moe import moe_step, seeded_moe

CPU = Clock(torch.device("cpu"))
ENGINE_CODE = {  # functions the engine runs per chunk; none may hold a compiled entry
    "LayerOverlap.run": LayerOverlap.run,
    "Schedule.forward": Schedule.forward,
    "_GroupedLinear.forward": _GroupedLinear.forward,
    "grouped_linear": grouped_linear,
}


def _code(fn):
    fn = getattr(fn, "_torchdynamo_orig_callable", fn)  # torch.compiler.disable's wrapper
    return fn.__code__


def test_compiled_layer_runs_the_engine_eagerly_with_the_same_results():
    torch._dynamo.reset()
    base = seeded_moe(0, num_shared_experts=1)
    x = torch.randn(48, 16, generator=torch.Generator().manual_seed(1))
    for chunks in (2, 4, 1, 2):  # the trial's candidates, then the kept one
        ref, comp = copy.deepcopy(base), copy.deepcopy(base)
        ref.overlap = LayerOverlap(0, chunks, True, CPU, chunk_by="experts")
        comp.overlap = LayerOverlap(0, chunks, True, CPU, chunk_by="experts")
        want = moe_step(ref, x)
        comp.forward = torch.compile(comp.forward, backend="eager")
        got = moe_step(comp, x)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            what = f"chunks {chunks}, item {i} of moe_step"
            assert (g is None) == (w is None), f"{what}: a deferred dW was not flushed"
            torch.testing.assert_close(g, w, rtol=0, atol=0, msg=what)
        comp.overlap.flush()
    compiled = {
        name: len(_debug_get_cache_entry_list(_code(fn))) for name, fn in ENGINE_CODE.items()
    }
    assert not any(compiled.values()), f"compiled frames inside the engine: {compiled}"
