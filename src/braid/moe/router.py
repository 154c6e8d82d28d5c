"""Top-k router: scores, expert choice, gates, and the balancing losses.

Shape legend: N tokens on this rank, E experts, K experts per token.

- scores: softmax over experts (Switch/GShard) or sigmoid per expert (DeepSeek-V3).
- choice: top-k of the scores, plus a per-expert bias when aux-loss-free balancing is on; the
  bias only changes which experts are chosen, never the gate values (DeepSeek-V3, sec. 2.1.2).
- group-limited choice (DeepSeek-V3, `n_groups` > 1): the E experts form n_groups contiguous
  groups; a group's score is the sum of its two best choice scores (bias included, as in
  DeepSeek-V3's reference inference code), only the best `topk_groups` groups stay eligible,
  and the top-k is taken among their experts. With experts laid out contiguously over EP ranks
  and groups aligned to ranks, this bounds the ranks a token is sent to (docs/routing.md).
- gates: the chosen scores, renormalised to sum to one if `renormalize`, then multiplied by
  `routed_scaling` (DeepSeek-V3's routed_scaling_factor).
- aux loss (Switch eq. 4 / GShard): E * sum_i f_i * P_i, f_i the fraction of token copies sent
  to expert i and P_i the mean routing probability of expert i (for sigmoid scores, the scores
  normalised per token). f is counted over the global batch (all ranks) through `reduce`, so the
  loss does not depend on the layout; P is this rank's mean, and averaging gradients over ranks
  (as data parallelism does) yields the gradient of the global loss.
- z loss (ST-MoE eq. 5): mean over tokens of logsumexp(logits)^2.
- bias update (DeepSeek-V3): after each optimizer step, b_i += rate * sign(mean load - load_i)
  over the loads counted during the step (global, identical on every rank).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from braid.moe.config import MoEConfig


@dataclass
class RouterOutput:
    topk_idx_NK: Tensor  # chosen experts (int64)
    gates_NK: Tensor  # weights of the chosen experts, in the input dtype
    aux_loss: Tensor  # scalar, unweighted
    z_loss: Tensor  # scalar, unweighted
    counts_E: Tensor  # token copies per expert over the global batch (float, detached)


class Router(nn.Module):
    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, dim))
        # Aux-loss-free balancing state: the routing bias and the loads seen since the last update.
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts), persistent=True)
        self.register_buffer("load_acc", torch.zeros(cfg.num_experts), persistent=False)

    def forward(self, x_ND: Tensor, reduce: Callable[[Tensor], Tensor]) -> RouterOutput:
        # Routing in fp32: small logit differences decide expert choice (ST-MoE, sec. 3.1).
        # Autocast would run this GEMM in bf16 whatever its inputs are: turn it off here.
        with torch.autocast(x_ND.device.type, enabled=False):
            logits_NE = F.linear(x_ND.float(), self.weight.float())
        if self.cfg.score_func == "softmax":
            scores_NE = logits_NE.softmax(dim=-1)
        else:
            scores_NE = logits_NE.sigmoid()
        choice_NE = scores_NE + self.expert_bias if self.cfg.bias_balance else scores_NE
        if self.cfg.n_groups > 1:
            choice_NE = self._limit_groups(choice_NE)
        topk_idx_NK = choice_NE.topk(self.top_k, dim=-1, sorted=False).indices
        # Fixed order of a token's experts (ascending id) keeps combine sums layout-independent.
        topk_idx_NK = topk_idx_NK.sort(dim=-1).values
        gates_NK = scores_NE.gather(1, topk_idx_NK)
        if self.cfg.renormalize:
            gates_NK = gates_NK / (gates_NK.sum(dim=-1, keepdim=True) + 1e-20)
        if self.cfg.routed_scaling != 1.0:
            gates_NK = gates_NK * self.cfg.routed_scaling

        # One small all-reduce gives the global counts (the aux loss and the bias need them).
        local_counts_E = torch.zeros_like(scores_NE[0]).scatter_add_(
            0, topk_idx_NK.flatten(), torch.ones_like(topk_idx_NK.flatten(), dtype=torch.float32)
        )
        counts_E = reduce(local_counts_E.detach())

        aux = scores_NE.new_zeros(())
        if self.cfg.aux_loss_coef > 0 and x_ND.shape[0] > 0:
            probs_NE = scores_NE
            if self.cfg.score_func == "sigmoid":
                probs_NE = scores_NE / (scores_NE.sum(dim=-1, keepdim=True) + 1e-20)
            f_E = counts_E / counts_E.sum().clamp(min=1)
            aux = self.num_experts * (f_E * probs_NE.mean(dim=0)).sum()
        z = scores_NE.new_zeros(())
        if self.cfg.z_loss_coef > 0 and x_ND.shape[0] > 0:
            z = torch.logsumexp(logits_NE, dim=-1).square().mean()
        return RouterOutput(topk_idx_NK, gates_NK.to(x_ND.dtype), aux, z, counts_E)

    def _limit_groups(self, choice_NE: Tensor) -> Tensor:
        """choice_NE with the experts of all but the best topk_groups groups set to -inf."""
        G = self.cfg.n_groups
        choice_NGe = choice_NE.unflatten(-1, (G, -1))
        best = min(2, choice_NGe.shape[-1])  # a group of one expert scores by that expert
        group_NG = choice_NGe.topk(best, dim=-1).values.sum(dim=-1)
        keep_NG = group_NG.topk(self.cfg.topk_groups, dim=-1, sorted=False).indices
        mask_NG = torch.ones_like(group_NG, dtype=torch.bool).scatter_(1, keep_NG, False)
        return choice_NGe.masked_fill(mask_NG[..., None], float("-inf")).flatten(1)

    @torch.no_grad()
    def record_load(self, counts_E: Tensor) -> None:
        """Add one forward's global counts (called outside any recomputed region)."""
        if self.cfg.bias_balance:
            self.load_acc += counts_E

    @torch.no_grad()
    def update_bias(self) -> None:
        """DeepSeek-V3's aux-free step on the loads counted since the last call; then reset."""
        if self.cfg.bias_balance and self.load_acc.sum() > 0:
            err = self.load_acc.mean() - self.load_acc
            self.expert_bias += self.cfg.bias_update_rate * err.sign()
        self.load_acc.zero_()
