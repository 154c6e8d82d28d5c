"""The joined routed-expert dW as one Triton kernel over the chunks' operands in place
(`braid.ops.wgrad_triton`), on a GPU:

    PYTHONPATH=src python -m pytest -q -m gpu tests/gpu/test_wgrad_triton.py

Against an fp64 sum of the same bf16 products: one chunk and several, experts with no rows in
some chunks or in all, sizes that are not multiples of the tiles, written and added into an
existing grad; and the joined collector on CUDA against its gather path."""

import pytest
import torch

from braid.ops import wgrad_triton
from braid.ops.grouped_gemm import counts_to_offsets
from braid.overlap.joined_experts import JoinedExpertWgrad

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
]
BF16 = torch.bfloat16


def _chunks(counts, D, F, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    xs, gs, offs = [], [], []
    for c in counts:
        R = sum(c)
        xs.append(torch.randn(R, D, device="cuda", generator=gen).to(BF16))
        gs.append(torch.randn(R, F, device="cuda", generator=gen).to(BF16))
        offs.append(counts_to_offsets(torch.tensor(c, device="cuda")))
    return xs, gs, offs


def _reference(xs, gs, offs):
    E = offs[0].numel()
    out = torch.zeros(E, xs[0].shape[1], gs[0].shape[1], dtype=torch.float64, device="cuda")
    for x, g, o in zip(xs, gs, offs, strict=True):
        bounds = [0, *o.tolist()]
        for e in range(E):
            a, b = bounds[e], bounds[e + 1]
            out[e] += x[a:b].double().t() @ g[a:b].double()
    return out.float()


CASES = [
    ([[300, 0, 517, 64, 1]], 256, 384),  # one chunk
    ([[100, 0, 37, 5], [0, 0, 200, 8], [64, 0, 1, 0]], 200, 136),  # expert 1 empty everywhere
    ([[1000, 24], [3, 0]], 64, 1000),
]


@pytest.mark.parametrize("counts,D,F", CASES)
def test_the_kernel_is_the_fp32_sum_of_the_bf16_products(counts, D, F):
    xs, gs, offs = _chunks(counts, D, F)
    assert wgrad_triton.available(xs, gs)
    want = _reference(xs, gs, offs)
    got = wgrad_triton.wgrad_fp32(xs, gs, offs)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    acc = torch.randn_like(want)
    added = wgrad_triton.wgrad_fp32(xs, gs, offs, acc=acc.clone())
    torch.testing.assert_close(added, acc + want, rtol=1e-5, atol=1e-4)
    empty = [e for e in range(want.shape[0]) if all(c[e] == 0 for c in counts)]
    for e in empty:  # no rows anywhere: zeros written, the accumulator left as it was
        assert torch.equal(got[e], torch.zeros_like(got[e])) and torch.equal(added[e], acc[e])


def test_unaligned_operands_are_not_taken():
    xs, gs, _ = _chunks([[8, 8]], 64, 64)
    odd = torch.empty(16 * 64 + 1, dtype=BF16, device="cuda")[1:].view(16, 64)
    assert not wgrad_triton.available([odd], gs)
    assert not wgrad_triton.available([xs[0].float()], gs)
    assert not wgrad_triton.available([xs[0].t()], gs)


@pytest.mark.parametrize("existing", [False, True])
def test_the_joined_collector_on_cuda_matches_its_gather_path(monkeypatch, existing):
    """Three chunks handed over as `grouped_linear` hands them; the kernel's grad (written, or
    added in place into an existing one) equals the gather + grouped_mm path's within the
    latter's bf16 rounding of dW, and the fp64 reference within fp32 rounding."""
    counts = [[40, 0, 24, 8], [16, 8, 0, 40], [0, 32, 16, 16]]
    xs, gs, offs = _chunks(counts, 128, 96, seed=1)
    want = _reference(xs, gs, offs)
    grads = {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(wgrad_triton, "available", lambda *a: False)
        w = torch.nn.Parameter(torch.zeros(4, 128, 96, device="cuda"))
        start = torch.randn(4, 128, 96, device="cuda") if existing else None
        w.grad = None if start is None else start.clone()
        held = w.grad
        queue = []
        join = JoinedExpertWgrad(queue.append, [sum(c) for c in counts], "joined")
        for c in range(3):
            join.block(c).add_rows(w, xs[c], gs[c], offs[c], "grouped", 1.0)
        assert len(queue) == 1
        queue.pop()()
        assert w.grad.dtype == torch.float32
        if existing and fused:
            assert w.grad is held  # added in the kernel's epilogue, in place
        grads[fused] = w.grad - (0 if start is None else start)
    torch.testing.assert_close(grads[True], want, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(grads[False], grads[True], rtol=2e-2, atol=2e-2)


def test_the_operator_passes_torch_library_checks():
    (x,), (g,), (offs,) = _chunks([[96, 0, 160]], 64, 128, seed=3)
    torch.library.opcheck(wgrad_triton.wgrad_fp32_op, (x, g, offs))


@pytest.mark.parametrize("compiled", [False, True])
def test_autocast_experts_get_their_fp32_grad_from_the_kernel(compiled):
    """The plain path (an fp32 master weight, bf16 GEMMs): dW is the kernel's fp32 sum, eager
    and inside a compiled graph (`braid::wgrad_fp32`; fullgraph: the backward is the compiled
    one, not an eager fallback), not a bf16 dW cast up."""
    from braid.ops.grouped_gemm import grouped_linear

    counts = [256, 0, 384, 128]
    (x,), (gy,), (offs,) = _chunks([counts], 256, 192, seed=4)
    w = torch.nn.Parameter(torch.randn(4, 256, 192, device="cuda") * 0.05)
    fn = torch.compile(grouped_linear, fullgraph=True) if compiled else grouped_linear
    with torch.autocast("cuda", dtype=BF16):
        y = fn(x.float().requires_grad_(), w, offs)
    y.backward(gy)
    assert w.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad, _reference([x], [gy], [offs]), rtol=1e-5, atol=1e-4)
    assert not torch.equal(w.grad.to(BF16).float(), w.grad)


def test_a_deferred_dw_is_written_wide_first_and_added_narrow_after():
    from braid.ops.grouped_gemm import gmm_wgrad, grouped_linear

    (x,), (gy,), (offs,) = _chunks([[64, 32, 0, 160]], 128, 96, seed=5)
    w = torch.nn.Parameter(torch.randn(4, 128, 96, device="cuda") * 0.05)
    queue = []
    for step in range(2):
        with torch.autocast("cuda", dtype=BF16):
            y = grouped_linear(x.float(), w, offs, wgrad_sink=queue.append)
        y.backward(gy)
        queue.pop()()
        if step == 0:
            first = w.grad.clone()
            torch.testing.assert_close(first, _reference([x], [gy], [offs]), rtol=1e-5, atol=1e-4)
    assert torch.equal(w.grad, first + gmm_wgrad(x, gy, offs, "grouped").float())


def test_a_captured_cuda_graph_takes_grouped_mm_and_the_cast():
    """While a CUDA graph is captured (reduce-overhead, `train.cuda_graphs`) the kernel is not
    launched: its address table is a host copy that a replay would not renew. The replayed
    graph gives grouped_mm's bf16 dW cast to fp32."""
    from braid.ops.grouped_gemm import gmm_wgrad

    (x,), (g,), (offs,) = _chunks([[128, 64, 0, 192]], 128, 96, seed=6)
    want = gmm_wgrad(x, g, offs, "grouped").float()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        gmm_wgrad(x, g, offs, "grouped", torch.float32)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gmm_wgrad(x, g, offs, "grouped", torch.float32)
    graph.replay()
    torch.cuda.synchronize()
    assert out.dtype == torch.float32 and torch.equal(out, want)


@pytest.mark.parametrize("compiled", [False, True])
def test_experts_on_weights_cast_once_get_the_kernel_s_fp32_dw(compiled):
    """`train.cast_weights_once`: the experts' GEMMs read the step's bf16 copy, the fp32 weight
    keeps its grad, written by the kernel: the autocast path's grads, bit for bit."""
    from braid.moe.experts import GroupedExperts
    from braid.train.weight_cast import StepCast

    torch.manual_seed(7)
    ref = GroupedExperts(4, 256, 96).cuda()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.05)
    got = GroupedExperts(4, 256, 96).cuda()
    got.load_state_dict(ref.state_dict())
    counts = torch.tensor([256, 0, 384, 128], device="cuda")
    x = torch.randn(768, 256, device="cuda")
    gy = torch.randn(768, 256, device="cuda", dtype=BF16)
    wrap = (lambda m: torch.compile(m, fullgraph=True)) if compiled else (lambda m: m)
    with torch.autocast("cuda", dtype=BF16):
        wrap(ref)(x, counts).backward(gy)
    cast = StepCast(got, feed_experts=True)
    assert sorted(cast.fed) == [0, 1]
    with cast.swapped(), torch.autocast("cuda", dtype=BF16):
        wrap(got)(x, counts).backward(gy)
    for a, b in ((ref.w13, got.w13), (ref.w2, got.w2)):
        assert b.dtype == b.grad.dtype == torch.float32
        assert torch.equal(a.grad, b.grad)
        assert not torch.equal(b.grad.to(BF16).float(), b.grad)  # not a bf16 dW cast up
