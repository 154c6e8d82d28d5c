"""Multi-token prediction (DeepSeek-V3, sec. 2.2): D sequential modules after the main model.

Module k (1-based) predicts token t_{i+k+1} at position i:
    h'_i = W_k [RMSNorm(h^{k-1}_i) ; RMSNorm(Emb(t_{i+k}))]     W_k: Linear(2*dim -> dim)
    h^k  = Block_k(h')                                          one ordinary transformer block
    p^k  = Head(RMSNorm_k(h^k))                                 the main model's output head
h^0 is the main model's last hidden state (before its final norm); the embedding and the output
head are the main model's own (shared, not copied). Each depth drops the last position, whose
input token t_{i+k} is not in the sequence: with inputs of length T, depth k covers T-k
positions and its targets are the main targets shifted by k (`y[:, k:]`). The training loss
adds mtp_loss_weight / D * sum_k CE_k (the paper's lambda/D * sum_k L^k_MTP).

The block is ordinary: dense or MoE like the main model's last layer (DeepSeek-V3's last layer
and its MTP block are both MoE). Parameter names follow DeepSeek-V3's checkpoints (enorm,
hnorm, eh_proj; `norm` is the head's norm, shared_head.norm there).
Shape legend: B batch, T time, D dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from braid.model.layers import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, dim: int, eps: float, block: nn.Module):
        super().__init__()
        self.hnorm = RMSNorm(dim, eps)
        self.enorm = RMSNorm(dim, eps)
        self.eh_proj = nn.Linear(2 * dim, dim, bias=False)
        self.block = block
        self.norm = RMSNorm(dim, eps)

    def forward(self, h_BTD: Tensor, emb_BTD: Tensor, rope: Tensor):
        """(h^k before the head's norm, its normed copy for the head, MoE stats or None)."""
        x_BTD = self.eh_proj(torch.cat([self.hnorm(h_BTD), self.enorm(emb_BTD)], dim=-1))
        h_BTD, stats = self.block(x_BTD, rope)
        return h_BTD, self.norm(h_BTD), stats
