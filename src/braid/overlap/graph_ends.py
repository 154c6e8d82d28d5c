"""The two ends of a pipeline chunk's autograd graph (`braid.overlap.pipeline`).

The pipeline runs each chunk's expert (and shared-expert) computation as a graph of its own,
outside the autograd graph of the layer, and replays its backward by hand
(`torch.autograd.backward(root, grad)`) at the point of the schedule where an exchange is in
flight. `Capture` enters such a graph: the chunk's (detached) input requires grad through an
`anchor` (a zero-dim leaf that requires grad), and the grad reaching it is appended to a list
(`box`) for the schedule to send on. `Root` leaves it: a zero-memory stand-in
for the chunk's output to call backward on later, so nothing but the graph itself is kept.
"""

from __future__ import annotations

import torch


class Capture(torch.autograd.Function):
    """Enter a chunk graph: `data` requires grad through `anchor`; its grad lands in `box`."""

    @staticmethod
    def forward(ctx, anchor, data, box):
        ctx.box = box
        return data.view_as(data)

    @staticmethod
    def backward(ctx, g):
        ctx.box.append(g)
        return None, None, None


class Root(torch.autograd.Function):
    """Leave a chunk graph: a zero-memory stand-in for `y` to call backward on later."""

    @staticmethod
    def forward(ctx, y):
        return y.new_zeros(()).expand(y.shape)

    @staticmethod
    def backward(ctx, g):
        return g
