"""The chunk trial: `overlap.chunks = "auto"` times the planner's best candidates and keeps
the fastest.

Job: the cost model (`braid.overlap.planner`) ranks chunk counts, but its error is a few percent
and varies between runs, which is as large as the gaps it must tell apart (e.g. C = 2 against
C = 4 on a fine-grained layer). So, with `overlap.trial_steps` = T > 0, each MoE layer tries
its `TRIAL_CANDIDATES` best-predicted C (and C = 1, the plain schedule) on the first optimizer
steps of the run, times its pipelined region each step (`LayerTimeline`: measured_ms, the
same events as `overlap.report`), and keeps the C of the lowest time (the fastest of its
steps: noise only slows a step, and a candidate's first step may pay one-off costs, e.g. a
first cuBLAS call at a new shape, which would move a median of two).

Schedule: `WARMUP` step(s) at the planned C (allocator, autotuning and first-call costs stay
out of the timings), then T rounds; every round runs each candidate once (round-robin, so a
drift of the GPU's clocks over the trial hits every candidate alike). A layer with fewer
candidates than another repeats its own list. Training goes on meanwhile: the chunk count
changes rounding only (chunks of experts: bitwise the plain path's results; of tokens: the
order of the dW sums), not the model's numbers beyond that.

Ranks: every rank builds the same candidate lists (from the cost model, agreed across ranks),
so at a step all ranks run the same C; before the choice the times are agreed (`agree`, MAX
over the world, as the planner's measurements are), so every rank keeps the same C (a layer's
chunk exchanges must match across ranks).
"""

from __future__ import annotations

from collections.abc import Callable

TRIAL_CANDIDATES = 3  # best-predicted chunk counts tried per layer, besides C = 1
WARMUP = 1  # steps at the planned C before the first timed one


def trial_candidates(table: dict[int, float], planned: int) -> tuple[int, ...]:
    """The chunk counts to try, ascending: C = 1, the planned C, and the best predicted by
    `table` (C -> predicted ms; ties go to the smaller C) up to `TRIAL_CANDIDATES` besides 1."""
    ranked = sorted(table, key=lambda c: (table[c], c))
    keep = {1, planned}
    for c in ranked:
        if len(keep - {1}) >= TRIAL_CANDIDATES:
            break
        keep.add(c)
    return tuple(sorted(c for c in keep if c == 1 or c in table))


class ChunkTrial:
    """The trial of every layer's candidates (layer -> chunk counts) over `rounds` rounds."""

    def __init__(
        self, candidates: dict[int, tuple[int, ...]], rounds: int, planned: dict[int, int]
    ):
        if rounds < 1:
            raise ValueError(f"a chunk trial needs rounds >= 1, got {rounds}")
        self.candidates, self.planned = candidates, planned
        width = max((len(c) for c in candidates.values()), default=0)
        self.length = WARMUP + rounds * width  # steps, warm-up included
        self.times: dict[int, dict[int, list[float]]] = {
            i: {c: [] for c in cs} for i, cs in candidates.items()
        }
        self.best_ms: dict[tuple[int, int], float] = {}  # (layer, C) -> agreed ms, by `decide`

    def chunks_at(self, index: int) -> dict[int, int]:
        """What each layer runs at the trial's step `index` (0-based; warm-up: the plan)."""
        if index < WARMUP:
            return dict(self.planned)
        k = index - WARMUP
        return {i: cs[k % len(cs)] for i, cs in self.candidates.items()}

    def record(self, index: int, measured_ms: dict[int, float]) -> None:
        """Step `index`'s measured ms per layer (warm-up steps are not kept)."""
        if index < WARMUP:
            return
        for i, c in self.chunks_at(index).items():
            if i in measured_ms:
                self.times[i][c].append(measured_ms[i])

    def decide(self, agree: Callable[[list[float]], list[float]]) -> dict[int, int]:
        """Each layer's fastest candidate by its fastest step, after `agree` (MAX over the ranks)
        has made every rank's times the same; ties go to the smaller C. A candidate never timed
        (a layer skipped at every step) counts as infinitely slow."""
        keys = [(i, c) for i, cs in sorted(self.times.items()) for c in sorted(cs)]
        local = [min(self.times[i][c], default=float("inf")) for i, c in keys]
        best = self.best_ms = dict(zip(keys, agree(local), strict=True))
        return {
            i: min(cs, key=lambda c, i=i: (best[(i, c)], c)) for i, cs in self.candidates.items()
        }


def describe_trial(
    layer: int, best_ms: dict[tuple[int, int], float], chosen: int, planned: int
) -> str:
    """The trial's log line for one layer."""
    times = ", ".join(f"C={c}: {ms:.3f}" for (i, c), ms in sorted(best_ms.items()) if i == layer)
    return (
        f"overlap trial moe{layer}: measured ms fwd+bwd (fastest step) {times} -> chunks={chosen} "
        f"(planned {planned})"
    )
