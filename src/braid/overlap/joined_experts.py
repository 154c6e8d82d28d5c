"""One routed-expert dW over every chunk of tokens (`overlap.chunk_dw`).

Job: with chunks of tokens, every chunk's backward would produce a full weight-sized dW of
every local expert and add it into the grads: C weight-sized adds per layer, about 12 bytes a
parameter each (bf16 dW written and read, the fp32 grad read and written). For big experts
held by few ranks that is most of what chunking costs. Joined, the chunks leave their GEMM
operands here (x and the output grad of each grouped GEMM, rows grouped by expert within the
chunk), and once every chunk's are in, the rows are gathered expert-major (expert e: chunk 0's
rows of e, then chunk 1's, ...) and one grouped dW GEMM per weight runs over all of them, as
the unchunked layer's does: one task on the layer's queue with a deferred dW
(`overlap.split_dw`), else run at once in the last chunk's backward (`deferred=False`).

Cost and choice: the gather reads and writes each operand once (2 * rows * (in + out
features) * element bytes per weight); the per-chunk path adds (C - 1) extra weight-sized adds.
"joined" and "per_chunk" force one; "auto" decides per weight at its first chunk: joined where
the kernel below reads the chunks in place (no gather), else, deferred, by which moves fewer
bytes (from the layer's rows, the routes' received counts, and the weight's local size), and
not deferred, per chunk: that chunk's dW goes back to autograd (`add` returns False). The
joined path also keeps every chunk's operands until the last chunk's backward (about rows *
(2 * dim + 3 * hidden) * 2 bytes per layer) where the per-chunk path frees them as it goes;
the gather adds the larger gathered operand on top.

Order: the rows of an expert come out in chunk order, each chunk's in its own order, so on one
rank (or where every chunk's rows of an expert are its tokens in order) the joined GEMM sees
the plain path's rows in the plain path's order. (Not its bits: the operands themselves differ
from the plain path's in rounding, as the chunks' forward GEMMs run over fewer rows.)

Everything stays on the device: the row positions are built from the chunks' offsets (no host
sync), and each chunk's operands are written into place by one `index_copy_`.
On a GPU with Triton (fp32 weights, bf16 operands) there is no gather: `braid.ops.wgrad_triton`
runs one grouped GEMM whose reduction walks each expert's rows chunk by chunk where they lie,
and writes the fp32 grad (or adds into it) from its accumulators; "auto" then always joins.
Paths that cannot hand over operands (the fp8 experts) call a block as a plain task sink and
keep the per-chunk path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from braid.ops import grouped_gemm, wgrad_triton
from braid.ops.grouped_gemm import _local, accumulate_grad
from braid.overlap.config import CHUNK_DW

Task = Callable[[], None]
ADD_BYTES = 12  # per parameter and chunk: bf16 dW written and read, fp32 grad read and written


def joined_is_cheaper(chunks: int, gather_bytes: float, weight_numel: int) -> bool:
    """Whether gathering every chunk's operands (`gather_bytes` for all C chunks) moves fewer
    bytes than the C - 1 extra weight-sized adds of the per-chunk path."""
    return gather_bytes < (chunks - 1) * ADD_BYTES * weight_numel


def auto_joins(fused: bool, deferred: bool, chunks: int, gather_bytes: float, numel: int) -> bool:
    """`chunk_dw="auto"`'s choice, for the runtime and the planner alike: joined where the
    kernel reads the chunks in place (`fused`); elsewhere, with a deferred dW, where the gather
    moves fewer bytes than the per-chunk adds (`joined_is_cheaper`); not deferred, per chunk
    (a gather on top of every chunk's operands held)."""
    return fused or (deferred and joined_is_cheaper(chunks, gather_bytes, numel))


class JoinedExpertWgrad:
    """The routed experts' dW of one pipelined layer call over `chunks` chunks of tokens.
    `block(c)` is chunk c's sink (what `grouped_linear` is given as its `wgrad_sink`)."""

    def __init__(
        self,
        sink: Callable[[Task], None],
        rows: list[int],
        mode: str = "auto",
        deferred: bool = True,
    ):
        if mode not in CHUNK_DW:
            raise ValueError(f"overlap.chunk_dw={mode!r}: expected one of {', '.join(CHUNK_DW)}")
        self.sink, self.chunks, self.rows, self.mode = sink, len(rows), sum(rows), mode
        # Not deferred (no split_dw): `sink` runs a task at once, and a dW not joined goes back
        # to autograd (`add` says so) instead of through the sink.
        self.deferred = deferred
        # id(w) -> (w, impl, divide, {chunk: operands}) of the weights being joined
        self._parts: dict[int, tuple[Tensor, str, float, dict[int, tuple]]] = {}
        self._joined: dict[int, bool] = {}  # id(w) -> joined (decided at its first chunk)

    def block(self, c: int) -> _ChunkBlock:
        return _ChunkBlock(self, c)

    def decided(self) -> str | None:
        """What the backward did with the routed dW: "joined", "per_chunk" (every weight alike),
        "mixed", or None (no dW reached here: the fp8 experts, or no backward yet)."""
        kinds = {"joined" if j else "per_chunk" for j in self._joined.values()}
        return None if not kinds else kinds.pop() if len(kinds) == 1 else "mixed"

    def _decide(self, w: Tensor, x: Tensor, g: Tensor) -> bool:
        key = id(w)
        if key not in self._joined:
            if self.mode != "auto":
                self._joined[key] = self.mode == "joined"
            else:  # a gather would move every chunk's rows (`rows`, the layer's total) once
                per_row = x.shape[1] * x.element_size() + g.shape[1] * g.element_size()
                fused, gather = fused_join(w, [x], [g]), 2 * per_row * self.rows
                numel = _local(w).numel()
                self._joined[key] = auto_joins(fused, self.deferred, self.chunks, gather, numel)
        return self._joined[key]

    def add(
        self, c: int, w: Tensor, x: Tensor, g: Tensor, offs: Tensor, impl: str, div: float
    ) -> bool:
        """Chunk c's operands of weight `w`'s dW (x [R_c, D], g [R_c, F], rows grouped by
        expert at `offs`); the last chunk's queues the one joined task. False: not taken (per
        chunk and not deferred: the caller returns this chunk's dW to autograd)."""
        if not self._decide(w, x, g):
            if not self.deferred:
                return False
            dw_fn = lambda dt=None: grouped_gemm.gmm_wgrad(x, g, offs, impl, dt)  # noqa: E731
            wide = grouped_gemm.wide_dtype(w, x, g, impl)
            grouped_gemm.deliver_wgrad(w, dw_fn, div, self.sink, None, wide)  # queued
            return True
        parts = self._parts.setdefault(id(w), (w, impl, div, {}))[3]
        if c in parts:  # a chunk's backward ran twice: its first dW would be lost
            raise RuntimeError(f"joined expert dW: chunk {c} of this layer call handed over twice")
        parts[c] = (x, g, offs)
        if len(parts) == self.chunks:
            self._queue(id(w))
        return True

    def close(self) -> None:
        """Queue the joined dW of any weight some chunk's backward never reached (an unused
        chunk's graph), over the chunks that did: no dW is ever left behind."""
        for key in list(self._parts):
            self._queue(key)

    def _queue(self, key: int) -> None:
        w, impl, div, parts = self._parts.pop(key)
        ordered = [parts[c] for c in sorted(parts)]
        self.sink(lambda: _join(w, ordered, impl, div))


def fused_join(w: Tensor, xs: list[Tensor], gs: list[Tensor]) -> bool:
    """Whether `wgrad_triton` computes the joined dW: fp32 weights, the chunks' bf16 operands
    on a GPU with Triton."""
    return _local(w).dtype == torch.float32 and wgrad_triton.available(xs, gs)


def _join(w: Tensor, parts: list[tuple[Tensor, Tensor, Tensor]], impl: str, div: float) -> None:
    """The joined dW of `w` into its grad: on a GPU with Triton one kernel over the chunks'
    operands where they lie, writing the fp32 grad (or adding into it in place); otherwise the
    rows gathered expert-major and one `F.grouped_mm` (`_joined_dw`)."""
    xs, gs, offs = ([p[k] for p in parts] for k in range(3))
    if not fused_join(w, xs, gs):
        accumulate_grad(w, _joined_dw(parts, impl), div)
        return
    grad = w.grad
    acc = None if grad is None or div != 1.0 else _local(grad)
    if acc is not None and acc.dtype == torch.float32 and acc.is_contiguous():
        wgrad_triton.wgrad_fp32(xs, gs, offs, acc=acc)  # added in the kernel's epilogue
        return
    accumulate_grad(w, wgrad_triton.wgrad_fp32(xs, gs, offs), div)


def expert_major(offs_per_chunk: list[Tensor], rows: list[int]) -> tuple[list[Tensor], Tensor]:
    """Where each chunk's rows go when every chunk's rows are laid out expert-major (expert e:
    chunk 0's rows of e, then chunk 1's, ...), and that layout's offsets (int32).
    `offs_per_chunk[c]` holds chunk c's cumulative row counts per expert and `rows[c]` its row
    count (which the offsets end at: grouped GEMMs take no padding rows). On the device, no
    host sync."""
    offs = torch.stack([o.long() for o in offs_per_chunk])  # [C, E]
    counts = torch.diff(offs, dim=1, prepend=offs.new_zeros(offs.shape[0], 1))
    total_e = counts.sum(0)
    start_e = torch.cumsum(total_e, 0) - total_e  # each expert's first row in the layout
    before_ce = torch.cumsum(counts, 0) - counts  # rows of e in the chunks before c
    # Row i of chunk c, of expert e, goes to i + shift[c, e]: its expert's start in the layout,
    # plus the rows of e in earlier chunks, less where e's rows start within the chunk.
    shift = start_e + before_ce - (offs - counts)
    last = offs.shape[1] - 1
    dest = []
    for c, n in enumerate(rows):
        i = torch.arange(n, device=offs.device)
        e = torch.searchsorted(offs[c], i, right=True).clamp_(max=last)
        dest.append(i + shift[c, e])
    return dest, torch.cumsum(total_e, 0).to(torch.int32)


def _joined_dw(parts: list[tuple[Tensor, Tensor, Tensor]], impl: str) -> Tensor:
    """dW [E, D, F] over every chunk's rows, gathered expert-major (one grouped GEMM). One
    operand at a time, each chunk's freed once placed: the peak is the chunks' operands plus
    the larger gathered one."""
    dest, offs = expert_major([o for _, _, o in parts], [x.shape[0] for x, _, _ in parts])
    gathered = []
    for k in (0, 1):  # x, then g
        first = parts[0][k]
        out = first.new_empty((sum(p[k].shape[0] for p in parts), first.shape[1]))
        for c, d in enumerate(dest):
            out.index_copy_(0, d, parts[c][k])
            parts[c] = (*parts[c][:k], None, *parts[c][k + 1 :])  # type: ignore[assignment]
        gathered.append(out)
    return grouped_gemm.gmm_wgrad(gathered[0], gathered[1], offs, impl)


class _ChunkBlock:
    """Chunk c of a `JoinedExpertWgrad`: `grouped_linear` hands it its dW operands (`add`);
    any other dW arrives as a task and goes to the sink as it is (queued, or run at once when
    not deferred; the engine gives the fp8 experts, whose dW comes as tasks, no blocks unless
    their dW is deferred)."""

    def __init__(self, joined: JoinedExpertWgrad, c: int):
        self.joined, self.c = joined, c

    def __call__(self, task: Task) -> None:
        self.joined.sink(task)

    def add_rows(
        self, w: Tensor, x: Tensor, g: Tensor, offs: Tensor, impl: str, div: float
    ) -> bool:
        return self.joined.add(self.c, w, x, g, offs, impl, div)
