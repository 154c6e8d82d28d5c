"""A planner cost model in layer units, shared by the planner tests: for a `LayerShape`, the
per-byte and per-FLOP costs are scaled so that `x_ms` is one full dispatch's time on the wire
and `e_ms` one full expert pass (forward), whatever the shape's sizes."""

from __future__ import annotations

from braid.overlap.planner import CostModel, LayerShape


def wire_bytes(shape: LayerShape) -> float:
    """Bytes one full dispatch sends off the rank ((W-1)/W of the payload, W = 4 here)."""
    return shape.tokens * shape.top_k * shape.dim * shape.elem_bytes * 3 / 4


def pass_flops(shape: LayerShape) -> float:
    """FLOPs of one full expert pass (forward: three GEMMs of the SwiGLU experts)."""
    return 6.0 * shape.tokens * shape.top_k * shape.dim * shape.hidden


def unit_cost_model(
    shape: LayerShape, lat=0.05, x_ms=1.0, call=0.01, e_ms=2.0, kappa=0.0, dw=0.0
) -> CostModel:
    return CostModel(
        a2a_latency_ms=lat,
        a2a_ms_per_byte=x_ms / wire_bytes(shape),
        gemm_latency_ms=call,
        gemm_ms_per_flop=e_ms / pass_flops(shape),
        interference=kappa,
        dw_accumulate_ms=dw,
    )
