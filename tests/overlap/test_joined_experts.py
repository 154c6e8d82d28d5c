"""One routed-expert dW over every chunk of tokens (`overlap.chunk_dw`): the expert-major layout
against a host-side reference, each joined expert grad exactly one dW over the chunks' operands
(and within rounding of the unchunked layer's), grad_divide and micro-batches, the byte rule of
"auto", the safety nets (a chunk never reached, a chunk handed over twice), and the knob."""

from __future__ import annotations

import copy

import pytest
import torch

from braid.config import load_config
from braid.errors import ConfigError
from braid.ops.grouped_gemm import counts_to_offsets, gmm_wgrad
from braid.overlap import joined_experts
from braid.overlap.config import OverlapConfig
from braid.overlap.engine import LayerOverlap
from braid.overlap.joined_experts import JoinedExpertWgrad, expert_major, joined_is_cheaper
from braid.overlap.streams import Clock
from small_moe import moe_step, seeded_moe

CPU = Clock(torch.device("cpu"))


def _host_layout(counts: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Reference: walk the layout expert by expert, chunk by chunk, on the host."""
    C, E = len(counts), len(counts[0])
    starts = [[sum(counts[c][:e]) for e in range(E)] for c in range(C)]
    dest = [[0] * sum(counts[c]) for c in range(C)]
    pos, offs = 0, []
    for e in range(E):
        for c in range(C):
            for k in range(counts[c][e]):
                dest[c][starts[c][e] + k] = pos
                pos += 1
        offs.append(pos)
    return dest, offs


@pytest.mark.parametrize(
    "counts",
    [
        [[2, 0, 3], [1, 4, 0]],
        [[0, 0, 0], [3, 1, 2], [0, 5, 1]],  # an empty chunk first
        [[1, 2, 3, 4]],
        [[0, 2], [0, 0], [4, 0], [1, 1]],  # an empty chunk between
    ],
)
def test_expert_major_layout_matches_a_host_walk(counts):
    offs = [counts_to_offsets(torch.tensor(c)) for c in counts]
    dest, joined = expert_major(offs, [sum(c) for c in counts])
    want_dest, want_offs = _host_layout(counts)
    assert [d.tolist() for d in dest] == want_dest
    assert joined.dtype == torch.int32 and joined.tolist() == want_offs
    flat = sorted(i for d in want_dest for i in d)
    assert flat == list(range(sum(map(sum, counts))))  # a permutation: every row placed once


def _expert_grads(moe) -> list[torch.Tensor]:
    return [moe.experts.w13.grad, moe.experts.w2.grad]


def _host_joined_dw(parts: list[tuple], impl: str) -> torch.Tensor:
    """Reference: the chunks' rows sliced expert by expert on the host, then one dW."""
    bounds = [[0, *p[4].tolist()] for p in parts]  # (chunk, id(w), x, g, offs)
    xs, gs, counts = [], [], []
    for e in range(len(bounds[0]) - 1):
        for (_, _, x, g, _), b in zip(parts, bounds, strict=True):
            xs.append(x[b[e] : b[e + 1]])
            gs.append(g[b[e] : b[e + 1]])
        counts.append(sum(b[e + 1] - b[e] for b in bounds))
    offs = counts_to_offsets(torch.tensor(counts))
    return gmm_wgrad(torch.cat(xs), torch.cat(gs), offs, impl)


@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_joined_token_chunks_run_one_dw_over_every_chunks_rows(monkeypatch, impl):
    """Each expert weight's grad is exactly one dW over the chunks' operands laid out expert by
    expert, chunk by chunk (a host-side reference), for C in {2, 3, 4, 20} (20 > 14 tokens
    leaves chunks empty); every output and grad stays within rounding of the unchunked layer,
    as does the per-chunk path's."""
    seen: list[tuple] = []
    real = JoinedExpertWgrad.add

    def spy(self, c, w, x, g, offs, impl_, div):
        seen.append((c, id(w), x, g, offs))
        return real(self, c, w, x, g, offs, impl_, div)

    monkeypatch.setattr(JoinedExpertWgrad, "add", spy)
    base = seeded_moe(expert_impl=impl)
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(5))
    ref = copy.deepcopy(base)
    ref.overlap = LayerOverlap(0, 1, True, CPU)
    ref_out = moe_step(ref, x)
    for chunks in (2, 3, 4, 20):
        for chunk_dw in ("joined", "per_chunk"):
            seen.clear()
            moe = copy.deepcopy(base)
            moe.overlap = LayerOverlap(0, chunks, True, CPU, chunk_by="tokens", chunk_dw=chunk_dw)
            out = moe_step(moe, x)
            assert len(moe.overlap.queue) == 0
            for a, b in zip(out, ref_out, strict=True):
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (chunks, chunk_dw)
            if chunk_dw != "joined":
                continue
            for name in ("w13", "w2"):
                w = getattr(moe.experts, name)
                parts = sorted((p for p in seen if p[1] == id(w)), key=lambda p: p[0])
                assert [p[0] for p in parts] == list(range(chunks)), (chunks, name)
                assert torch.equal(w.grad, _host_joined_dw(parts, impl)), (chunks, name)


@pytest.mark.parametrize("split", [True, False])
def test_where_the_joined_dw_runs(split):
    """With split_dw the joined dW is a task of the layer's queue (drained in the exchange
    windows); without, it runs at the last chunk's backward where "joined" is asked for, and
    "auto" (no kernel on a CPU) hands each chunk's dW back to autograd. Either way the grads
    match the unchunked layer's within rounding."""
    base = seeded_moe()
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(8))
    ref = copy.deepcopy(base)
    ref.overlap = LayerOverlap(0, 1, split, CPU)
    ref_out = moe_step(ref, x)
    for chunk_dw in ("joined", "auto"):
        moe = copy.deepcopy(base)
        moe.overlap = LayerOverlap(0, 3, split, CPU, chunk_by="tokens", chunk_dw=chunk_dw)
        out = moe_step(moe, x)
        joined = moe.overlap.joined
        assert joined is not None and (joined.sink is moe.overlap.queue) == split, chunk_dw
        if not split:
            want = "joined" if chunk_dw == "joined" else "per_chunk"
            assert moe.overlap.routed_dw() == want, chunk_dw
        for a, b in zip(out, ref_out, strict=True):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (split, chunk_dw)


def _fake_kernel(xs, gs, offs, acc=None):
    """`wgrad_triton.wgrad_fp32`'s contract on a CPU: dW over every chunk's rows, written or
    added into `acc`."""
    dw = sum(gmm_wgrad(x, g, o, "loop").float() for x, g, o in zip(xs, gs, offs, strict=True))
    return dw if acc is None else acc.add_(dw)


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("divide", [1.0, 4.0])
def test_auto_joins_where_the_kernel_runs(monkeypatch, split, divide):
    """Where the kernel reads the chunks in place, "auto" joins with and without split_dw (one
    dW at the last chunk's backward, no per-chunk adds); over two micro-batches (the second
    added into the first's grad: in the kernel's epilogue where nothing divides) and with the
    experts' grad_divide, the grads match the unchunked layer's. (The kernel itself is checked
    against fp64 on a GPU, tests/gpu.)"""
    calls = []
    monkeypatch.setattr(joined_experts.wgrad_triton, "available", lambda xs, gs: True)

    def fake(xs, gs, offs, acc=None):
        calls.append((len(xs), acc is not None))
        return _fake_kernel(xs, gs, offs, acc)

    monkeypatch.setattr(joined_experts.wgrad_triton, "wgrad_fp32", fake)
    base = seeded_moe()
    base.experts.grad_divide = divide
    xs = [torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(s)) for s in (8, 9)]
    ref = copy.deepcopy(base)
    ref.overlap = LayerOverlap(0, 1, split, CPU)
    moe = copy.deepcopy(base)
    moe.overlap = LayerOverlap(0, 3, split, CPU, chunk_by="tokens", chunk_dw="auto")
    for x in xs:
        ref_out = moe_step(ref, x)
        out = moe_step(moe, x)
        assert moe.overlap.routed_dw() == "joined"
        for a, b in zip(out, ref_out, strict=True):  # outputs and the grads so far
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (split, divide)
    # w13 and w2, each over the three chunks at once; the second micro-batch adds in place
    # unless a divide applies (then the divided dW is added by accumulate_grad)
    assert calls == [(3, False)] * 2 + [(3, divide == 1.0)] * 2


def test_joined_dw_accumulates_over_micro_batches():
    """Two backward passes (grad accumulation): the joined dW adds into the grad the first
    left, within rounding of the unchunked path's two dW."""
    base = seeded_moe()
    xs = [torch.randn(1, 9, 16, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    grads = {}
    for name, overlap in (
        ("ref", LayerOverlap(0, 1, True, CPU)),
        ("joined", LayerOverlap(0, 3, True, CPU, chunk_by="tokens", chunk_dw="joined")),
        ("once", LayerOverlap(0, 3, True, CPU, chunk_by="tokens", chunk_dw="joined")),
    ):
        moe = copy.deepcopy(base)
        moe.overlap = overlap
        for x in xs if name != "once" else xs[:1]:
            moe_step(moe, x)
        grads[name] = _expert_grads(moe)
    for a, b, once in zip(grads["joined"], grads["ref"], grads["once"], strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(a, once, rtol=1e-3)  # the second pass did add


@pytest.mark.parametrize("chunk_dw", ["joined", "per_chunk"])
def test_the_experts_grad_divide_applies_to_the_joined_dw(chunk_dw):
    """`GroupedExperts.grad_divide` (set where no FSDP unit averages the experts' grads) divides
    the joined dW as it does the unchunked one."""
    base = seeded_moe()
    base.experts.grad_divide = 4.0
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(7))
    ref = copy.deepcopy(base)
    ref.overlap = LayerOverlap(0, 1, True, CPU)
    moe_step(ref, x)
    moe = copy.deepcopy(base)
    moe.overlap = LayerOverlap(0, 3, True, CPU, chunk_by="tokens", chunk_dw=chunk_dw)
    moe_step(moe, x)
    assert moe.overlap.joined.decided() == chunk_dw
    for a, b in zip(_expert_grads(moe), _expert_grads(ref), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_chunk_handed_over_twice_is_an_error():
    joined = JoinedExpertWgrad(lambda t: None, [2, 2], "joined")
    w = torch.zeros(1, 3, 4)
    x, g, offs = torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([2], dtype=torch.int32)
    joined.block(0).add_rows(w, x, g, offs, "loop", 1.0)
    with pytest.raises(RuntimeError, match="chunk 0 of this layer call handed over twice"):
        joined.block(0).add_rows(w, x, g, offs, "loop", 1.0)


def test_a_chunk_never_reached_is_joined_at_close():
    """`close()` queues the joined dW of the chunks that did arrive: nothing is left behind."""
    tasks: list = []
    w = torch.zeros(2, 3, 4, requires_grad=True)
    joined = JoinedExpertWgrad(tasks.append, [3, 0, 2], "joined")
    gen = torch.Generator().manual_seed(0)
    x0, g0 = torch.randn(3, 3, generator=gen), torch.randn(3, 4, generator=gen)
    x2, g2 = torch.randn(2, 3, generator=gen), torch.randn(2, 4, generator=gen)
    joined.block(0).add_rows(w, x0, g0, counts_to_offsets(torch.tensor([2, 1])), "loop", 1.0)
    joined.block(2).add_rows(w, x2, g2, counts_to_offsets(torch.tensor([1, 1])), "loop", 1.0)
    assert tasks == []  # chunk 1 still outstanding
    joined.close()
    assert len(tasks) == 1
    tasks[0]()
    x = torch.cat([x0[:2], x2[:1], x0[2:], x2[1:]])  # expert 0: chunk 0's, chunk 2's; expert 1
    g = torch.cat([g0[:2], g2[:1], g0[2:], g2[1:]])
    want = gmm_wgrad(x, g, counts_to_offsets(torch.tensor([3, 2])), "loop")
    assert torch.equal(w.grad, want)
    joined.close()
    assert len(tasks) == 1  # nothing queued twice


def test_a_plain_task_goes_to_the_queue_as_it_is():
    """The fp8 experts hand a block a finished task (no operands): it is queued unchanged."""
    tasks: list = []
    joined = JoinedExpertWgrad(tasks.append, [1, 1], "joined")

    def task():
        return None

    joined.block(1)(task)
    assert tasks == [task]


def test_auto_joins_where_gathering_moves_fewer_bytes():
    """A Mixtral-like rank of a 4-rank group (2 experts of 4096 x 14336, 65536 rows): per
    chunk at C = 4 (three extra weight-sized adds move less than the gather), joined at C = 8;
    the same layer's 8 experts in one process join at C = 2."""
    D, F, R = 4096, 14336, 65536
    gather = 2 * R * (D + 2 * F) * 2  # w13: x [R, D] and g [R, 2F] in bf16, read and written
    assert not joined_is_cheaper(4, gather, 2 * D * 2 * F)
    assert joined_is_cheaper(8, gather, 2 * D * 2 * F)
    assert joined_is_cheaper(2, gather, 8 * D * 2 * F)
    # The collector's own decision, on meta tensors of those shapes.
    for L, C, want in ((2, 4, False), (2, 8, True), (8, 2, True)):
        tasks: list = []
        w = torch.empty(L, D, 2 * F, device="meta")
        x = torch.empty(R // C, D, dtype=torch.bfloat16, device="meta")
        g = torch.empty(R // C, 2 * F, dtype=torch.bfloat16, device="meta")
        joined = JoinedExpertWgrad(tasks.append, [R // C] * C, "auto")
        offs = torch.zeros(L, dtype=torch.int32, device="meta")
        joined.block(0).add_rows(w, x, g, offs, "grouped", 1.0)
        assert len(tasks) == (0 if want else 1), (L, C)


def test_chunk_dw_knob_accepts_its_modes_and_refuses_others():
    assert OverlapConfig().chunk_dw == "auto"
    for mode in ("auto", "joined", "per_chunk"):
        OverlapConfig(chunk_dw=mode).validate()
    with pytest.raises(ConfigError) as e:
        load_config(None, ["--overlap.chunk_dw=join"])
    msg = str(e.value)
    assert msg.startswith("config overlap.chunk_dw=") and "\n" not in msg, msg
    assert '"joined"' in msg and '"per_chunk"' in msg
    with pytest.raises(ValueError, match="overlap.chunk_dw='x'"):
        JoinedExpertWgrad(lambda t: None, [1], "x")
