"""The `[overlap]` section: hiding the exchange behind computation (see docs/overlap.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from braid.knobs import check, knob

SPLIT_DW = ("off", "experts", "all")
CHUNK_BY = ("auto", "experts", "tokens")
CHUNK_DW = ("auto", "joined", "per_chunk")
# Booleans stay accepted (configs written before the modes existed): false -> "off",
# true -> "experts". They are read as these names at construction, so a config holds a name.
SPLIT_DW_ALIASES = {False: "off", True: "experts"}


@dataclass(frozen=True, kw_only=True)
class OverlapConfig:
    split_dw: Literal["off", "experts", "all"] | bool = knob(
        "off",
        'Weight grads run during exchanges: "off"; "experts" (routed and shared experts; true); '
        '"all" (also attention and dense FFNs of the blocks above an MoE layer, and an untied '
        "output head into the top MoE layer).",
    )
    chunks: int | str = knob(1, 'Pipeline chunks per MoE layer: 1 (plain), n, or "auto".')
    max_chunks: int = knob(8, 'Largest C that chunks="auto" may pick.')
    trial_steps: int = knob(
        2,
        'chunks="auto": rounds of the chunk trial on the first steps, each timing the '
        "planner's best candidates (and C=1) once per MoE layer; the fastest is kept "
        "(0: the planner's pick, untimed).",
    )
    chunk_by: Literal["auto", "experts", "tokens"] = knob(
        "auto",
        'What a chunk holds: "experts" (a slice of each rank\'s local experts, all their rows: '
        'every expert\'s GEMMs and dW run once, at full size), "tokens" (a slice of the '
        "tokens, all experts: each chunk's dW added into the grads, or joined: `chunk_dw`), or "
        '"auto" (experts when chunks <= experts per rank, else tokens).',
    )
    chunk_dw: Literal["auto", "joined", "per_chunk"] = knob(
        "auto",
        "Chunks of tokens: the routed experts' dW per chunk, each added into the grads "
        '("per_chunk"), or one dW per weight over every chunk\'s rows ("joined": read in place '
        "by a Triton kernel on a GPU, else gathered expert-major; deferred with split_dw, else "
        "at the last chunk's backward, holding every chunk's operands until then), or "
        '"auto" (joined where the kernel runs; elsewhere, with split_dw, whichever moves '
        "fewer bytes, without, per chunk).",
    )
    report: bool = knob(
        False, "Time each MoE layer at log steps; print and log exposed/exchange ms per layer."
    )
    trace_step: int = knob(0, "Write a Chrome trace of this step to the run dir (0: none).")

    def __post_init__(self) -> None:
        if isinstance(self.split_dw, bool):
            object.__setattr__(self, "split_dw", SPLIT_DW_ALIASES[self.split_dw])

    @property
    def defers_dw(self) -> bool:
        """Any weight gradient deferred into the exchange windows ("experts" or "all")."""
        return self.split_dw != "off"

    def validate(self) -> None:
        allowed = 'expected one of "off", "experts", "all" (or false = "off", true = "experts")'
        check(self.split_dw in SPLIT_DW, "overlap.split_dw", self.split_dw, allowed)
        ok = self.chunks == "auto" or (isinstance(self.chunks, int) and self.chunks >= 1)
        check(ok, "overlap.chunks", self.chunks, 'must be an integer >= 1 or "auto"')
        check(self.max_chunks >= 1, "overlap.max_chunks", self.max_chunks, "must be >= 1")
        check(self.trial_steps >= 0, "overlap.trial_steps", self.trial_steps, "must be >= 0")
        check(
            self.chunk_by in CHUNK_BY,
            "overlap.chunk_by",
            self.chunk_by,
            'expected one of "auto", "experts", "tokens"',
        )
        check(
            self.chunk_dw in CHUNK_DW,
            "overlap.chunk_dw",
            self.chunk_dw,
            'expected one of "auto", "joined", "per_chunk"',
        )
        check(self.trace_step >= 0, "overlap.trace_step", self.trace_step, "must be >= 0")


def chunk_axis(chunk_by: str, chunks: int, num_local: int, strict: bool = True) -> str:
    """What C = `chunks` chunks of a layer with `num_local` experts per rank hold: "experts" or
    "tokens" (`OverlapConfig.chunk_by`; "auto": experts when there are enough of them).
    "experts" with more chunks than experts is an error, or with `strict` off (the planner
    probing chunk counts the layer will not run) "tokens"."""
    if chunk_by == "experts" and chunks > num_local:
        if not strict:
            return "tokens"
        raise ValueError(
            f'overlap.chunk_by="experts": chunks={chunks} is more than the {num_local} experts '
            'per rank; use chunks <= experts per rank, or chunk_by="tokens" or "auto"'
        )
    if chunks > 1 and (chunk_by == "experts" or (chunk_by == "auto" and chunks <= num_local)):
        return "experts"
    return "tokens"
