"""Model arithmetic from the config alone: parameters, active parameters, FLOPs, memory per GPU.

Counts match the built model exactly (a test compares them with `sum(p.numel())`).
Training FLOPs per token follow PaLM (appendix B): 6 * (active matmul parameters) for the
forward and backward GEMMs, plus 6 * n_layers * dim * seq_len for attention scores and values
(the causal half of PaLM's 12 * L * d * T). Memory per GPU counts fp32 weights, fp32 grads and
Adam's two fp32 moments (16 bytes per parameter), with dense weights fully sharded over all
ranks (or replicated) and each expert sharded over its dp = world/ep replicas.
"""

from __future__ import annotations

from dataclasses import dataclass

from braid.config import Config


@dataclass(frozen=True)
class ModelArithmetic:
    total_params: int
    active_params: int  # parameters a token touches (embedding row, router, K experts, ...)
    embedding_params: int
    expert_params: int  # routed experts over all MoE layers
    dense_params: int  # everything else
    flops_per_token: float  # training (forward + backward)

    def memory_per_gpu(self, world: int, ep: int, dense: str = "fsdp") -> float:
        """Bytes of fp32 weights + grads + Adam state on one GPU."""
        dense_share = self.dense_params / (world if dense == "fsdp" else 1)
        expert_share = self.expert_params / world  # E/ep experts per rank, sharded over dp
        return 16.0 * (dense_share + expert_share)


def arithmetic(cfg: Config, seq_len: int | None = None) -> ModelArithmetic:
    m, moe = cfg.model, cfg.moe
    seq_len = seq_len or cfg.train.seq_len
    D, hd = m.dim, m.head_dim
    attn = D * m.n_heads * hd + 2 * D * m.kv_heads * hd + m.n_heads * hd * D
    norms = 2 * D
    dense_ffn = 3 * D * m.ffn_hidden
    moe_ids = set(moe.moe_layer_ids(m.n_layers))
    expert = 3 * D * moe.expert_hidden
    shared = 3 * D * (moe.shared_hidden or moe.expert_hidden) * moe.num_shared_experts
    router = moe.num_experts * D

    emb = m.vocab_size * D
    out_proj = 0 if m.tie_embeddings else m.vocab_size * D
    total, experts_total, idle = emb + out_proj + D, 0, 0  # D: the final norm
    for i in range(m.n_layers):
        total += attn + norms
        if i in moe_ids:
            experts_total += moe.num_experts * expert
            idle += (moe.num_experts - moe.top_k) * expert
            total += router + shared + moe.num_experts * expert
        else:
            total += dense_ffn
    active = total - idle
    # GEMM weights a token goes through: all active weights but norms and the input lookup
    # (with tied embeddings the one matrix is the output GEMM, so it stays counted).
    active_matmul = active - norms * m.n_layers - D - (emb if out_proj else 0)
    flops = 6.0 * active_matmul + 6.0 * m.n_layers * D * seq_len
    return ModelArithmetic(
        total_params=total,
        active_params=active,
        embedding_params=emb + out_proj,
        expert_params=experts_total,
        dense_params=total - experts_total,
        flops_per_token=flops,
    )


def describe(cfg: Config, world: int | None = None, ep: int | None = None) -> str:
    ep = ep or cfg.parallel.ep
    world = world or ep
    a = arithmetic(cfg)
    gib = a.memory_per_gpu(world, ep, cfg.parallel.dense) / 2**30
    lines = [
        f"total parameters      {a.total_params / 1e9:8.3f} B  ({a.total_params:,})",
        f"active per token      {a.active_params / 1e9:8.3f} B  ({a.active_params:,})",
        f"routed experts        {a.expert_params / 1e9:8.3f} B in {len(cfg.moe.moe_layer_ids(cfg.model.n_layers))} MoE layers",
        f"train FLOPs / token   {a.flops_per_token / 1e9:8.3f} GFLOP (seq_len {cfg.train.seq_len})",
        f"memory / GPU          {gib:8.2f} GiB weights+grads+Adam (fp32) at world={world}, "
        f"ep={ep}, dp={world // ep}, dense={cfg.parallel.dense}",
    ]
    return "\n".join(lines)
