"""braid.overlap: hide the MoE all-to-all behind computation (see docs/overlap.md).

    OverlapSession.install / begin_step / flush / end_step   session.py  (the trainer's handle)
    LayerOverlap (moe.overlap)                                engine.py   (one layer's engine)
    Schedule                                                  pipeline.py (chunked region)
    JoinedExpertWgrad                                         joined_experts.py (chunk_dw)
    Capture, Root                                             graph_ends.py (a chunk's graph)
    half_tokens, joined_side                                  shared_halves.py (split_dw)
    WgradQueue, flush_point, split_linear, swiglu_split_dw    wgrad.py    (dW/dX split)
    JoinedWgrad                                               wgrad.py    (one dW of row blocks)
    CostModel, LayerShape, predict_ms, choose_chunks          planner.py
    measure, fit                                              measure.py  (the model's inputs)
    LayerTimeline, format_summary                             timeline.py
    Clock, InFlight, in_flight, new_stream, synchronize       streams.py

Imports go one way: overlap knows exchange handles and duck-typed MoE pieces, never braid.moe.
"""
