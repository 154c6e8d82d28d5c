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
With an overlap engine installed (`braid.overlap` sets `self.overlap`), steps 2-5 run as token
chunks whose exchanges overlap the expert GEMMs, and weight grads may be deferred into the
exchange windows (`overlap.chunks`, `overlap.split_dw`); the arithmetic per token is the same.

Shape legend: B batch, T time, N = B*T tokens, D dim, K experts per token, R rows received.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from braid.model.config import ModelConfig
from braid.model.layers import SwiGLU
from braid.moe.config import MoEConfig
from braid.moe.dispatcher import TokenDispatcher
from braid.moe.experts import GroupedExperts
from braid.moe.router import Router
from braid.ops.swiglu import gated


@dataclass
class MoEStats:
    aux_loss: Tensor  # unweighted Switch/GShard loss
    z_loss: Tensor  # unweighted router z-loss
    counts_E: Tensor  # global token copies per expert (detached)
    num_dropped: Tensor  # copies dropped by capacity on this rank


class MoE(nn.Module):
    def __init__(self, mcfg: ModelConfig, cfg: MoEConfig):
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
        self.overlap: Any = None  # braid.overlap.pipeline.LayerOverlap, installed from outside

    def forward(self, x_BTD: Tensor) -> tuple[Tensor, MoEStats]:
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        exchange = self.dispatcher.exchange
        if self.overlap is not None:
            x_ND = self.overlap.flush_point(x_ND)  # deferred dW is flushed when grads reach here
        r = self.router(x_ND, exchange.all_reduce_sum)  # 1. route
        if self.overlap is not None:  # 2-5, pipelined
            out_ND, dropped = self.overlap.run(x_ND, r.topk_idx_NK, r.gates_NK, self.dispatcher,
                                               self.experts, self.shared, self.shared_gate)
            return out_ND.view_as(x_BTD), MoEStats(r.aux_loss, r.z_loss, r.counts_E, dropped)
        d = self.dispatcher.dispatch(x_ND, r.topk_idx_NK)  # 2. dispatch
        y_RD = self.experts(d.x_RD, d.counts_L)  # 3. experts
        out_ND = self.dispatcher.combine(y_RD, r.gates_NK, d)  # 4. combine
        if self.shared is not None:
            out_ND = out_ND + gated(self.shared(x_ND), x_ND, self.shared_gate)  # 5. shared
        stats = MoEStats(r.aux_loss, r.z_loss, r.counts_E, d.num_dropped)
        return out_ND.view_as(x_BTD), stats

