"""The MoE layer: route -> dispatch -> experts -> combine (+ shared experts).

`MoE.forward` is the specification of Braid's MoE computation:
  1. route: the router picks K experts per token and their gates, and the balancing losses;
  2. dispatch: the dispatcher sorts token copies by expert and sends them to the experts' rank
     through its exchange (the local identity exchange in one process; `braid.parallel` installs
     an expert-parallel one — the model never knows which);
  3. experts: grouped SwiGLU GEMMs over the rows this rank received, grouped by local expert;
  4. combine: outputs go back to their tokens and are summed, weighted by the gates;
  5. shared experts (if any) see every token and are added, scaled per token by
     sigmoid(x . w_gate) when `moe.shared_gate` is on (Qwen2-MoE's gated shared expert).
Step 2 is two: (a) the dispatcher plans the routes (`TokenDispatcher.plan`: copies sorted by
expert, capacity, counts exchanged, splits read on the host), then (b) moves the rows.
The plain path runs 2b-5 once over one route. With an overlap engine installed (`braid.overlap`
sets `self.overlap`) the plan has one route per chunk (of experts or of tokens:
`overlap.chunk_by`) and the engine runs 2b-5 per route
through the dispatcher's primitives (send_rows -> issue_dispatch -> to_experts -> experts ->
from_experts -> issue_combine -> finish), so one chunk's exchange overlaps another's expert
GEMMs, and weight grads may be deferred into the exchange windows (`overlap.chunks`,
`overlap.split_dw`: the layer's experts, or with "all" also the attention and dense FFNs of the
blocks above it); the arithmetic per token is the plain path's.

Shape legend: B batch, T time, N = B*T tokens, D dim, K experts per token, R rows received.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor, nn

from braid.moe.config import MoEConfig
from braid.moe.dispatcher import TokenDispatcher
from braid.moe.experts import GroupedExperts
from braid.moe.router import Router
from braid.ops.swiglu import SwiGLU, gated


class Dims(Protocol):
    """What the MoE layer needs of the model's config (`braid.model.config.ModelConfig`): the
    residual width. A protocol, so that `braid.moe` imports nothing of `braid.model`."""

    dim: int


@dataclass
class MoEStats:
    aux_loss: Tensor  # unweighted Switch/GShard loss
    z_loss: Tensor  # unweighted router z-loss
    counts_E: Tensor  # global token copies per expert (detached)
    num_dropped: Tensor  # copies dropped by capacity on this rank


class MoE(nn.Module):
    def __init__(self, mcfg: Dims, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(mcfg.dim, cfg)
        self.experts = GroupedExperts(cfg.num_experts, mcfg.dim, cfg.expert_hidden, cfg.expert_impl)
        self.dispatcher = TokenDispatcher(cfg.num_experts, cfg.top_k, cfg.capacity_factor)
        self.shared = None
        if cfg.num_shared_experts:
            hidden = (cfg.shared_hidden or cfg.expert_hidden) * cfg.num_shared_experts
            self.shared = SwiGLU(mcfg.dim, hidden)
        # Qwen2-MoE: shared_expert_gate, Linear(dim, 1) without bias.
        self.shared_gate = nn.Linear(mcfg.dim, 1, bias=False) if cfg.shared_gate else None
        self.overlap: Any = None  # braid.overlap.engine.LayerOverlap, installed from outside

    def forward(self, x_BTD: Tensor) -> tuple[Tensor, MoEStats]:
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        d = self.dispatcher
        if self.overlap is not None:
            x_ND = self.overlap.flush_point(x_ND)  # grads here: queued dW run, experts reduced
        r = self.router(x_ND, d.exchange.all_reduce_sum)  # 1. route
        chunks, by = (1, "tokens") if self.overlap is None else self.overlap.chunking(d.chunk_local)
        plan = d.plan(r.topk_idx_NK, chunks, by)  # 2a. routes: counts exchanged, host splits
        if self.overlap is None:  # the plain path: one route, each step waited
            (route,) = plan.routes
            x_RD = d.dispatch(x_ND, route)  # 2b. dispatch
            y_RD = self.experts(x_RD, route.counts_L)  # 3. experts
            out_ND = d.combine(y_RD, r.gates_NK, route)  # 4. combine
            if self.shared is not None:
                out_ND = out_ND + gated(self.shared(x_ND), x_ND, self.shared_gate)  # 5. shared
        else:  # the chunked path: steps 2b-5 per route, scheduled by the overlap engine
            out_ND = self.overlap.run(
                x_ND, r.gates_NK, plan, d, self.experts, self.shared, self.shared_gate
            )
        stats = MoEStats(r.aux_loss, r.z_loss, r.counts_E, plan.num_dropped)
        return out_ND.view_as(x_BTD), stats
