"""Model arithmetic from the config alone: parameters, active parameters, FLOPs, memory per GPU.

Counts match the built model exactly (a test compares them with `sum(p.numel())`).
Training FLOPs per token follow PaLM (appendix B): 6 * (active matmul parameters) for the
forward and backward GEMMs, plus 6 * n_layers * dim * seq_len for attention scores and values
(the causal half of PaLM's 12 * L * d * T).

Memory per GPU (`memory_per_gpu`) follows the layout `braid.parallel` builds, tensor by tensor
from the model built on the meta device (no memory), for the rank that holds the most:
  - states: fp32 weights, fp32 grads and Adam's two fp32 moments, 16 bytes per element held.
    dense=fsdp: each dense tensor sharded on dim 0 over all ranks (FSDP pads dim 0 to a multiple
    of world, so rank 0 holds ceil(rows/world) rows); dense=replicate: every dense tensor whole.
    Experts: E/ep per rank, sharded over dp on the dim `expert_shard_dim` picks (ceil on dim 0);
  - FSDP buffers: while a block runs, its sharded tensors are all-gathered whole (fp32, as
    weights stay fp32 under autocast), the next block's are prefetched, and in backward its
    whole grads exist until the reduce-scatter: about 3 x the largest block's gathered tensors.
Activations are not counted (they depend on batch, seq_len and activation checkpointing).
"""

from __future__ import annotations

from dataclasses import dataclass

from braid.config import Config
from braid.errors import BraidError
from braid.parallel.mesh import expert_shard_dim


@dataclass(frozen=True)
class ModelArithmetic:
    total_params: int
    active_params: int  # parameters a token touches (embedding row, router, K experts, ...)
    embedding_params: int
    expert_params: int  # routed experts over all MoE layers
    dense_params: int  # everything else
    flops_per_token: float  # training (forward + backward)


@dataclass(frozen=True)
class Memory:
    states: float  # bytes of fp32 weights + grads + Adam moments held by the fullest rank
    buffers: float  # bytes of FSDP all-gathered weights and unreduced grads at the peak

    @property
    def total(self) -> float:
        return self.states + self.buffers


def memory_per_gpu(cfg: Config, world: int, ep: int, dense: str = "fsdp") -> Memory:
    """Bytes per GPU under (world, ep, dense); see the module docstring for what is counted."""
    import torch

    from braid.model.transformer import Transformer
    from braid.moe.experts import GroupedExperts

    check_info_layout(cfg, world, ep)
    dp = world // ep
    with torch.device("meta"):  # exact shapes, no memory
        model = Transformer(cfg.model, cfg.moe)
    experts = {
        id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()
    }
    root = [p for n, p in model.named_parameters() if not n.startswith("blocks.")]
    held, gathered = 0, []  # elements this rank holds; elements each FSDP block gathers whole
    for params in [root] + [list(b.parameters()) for b in model.blocks]:
        whole = 0
        for p in params:
            rows, row = p.shape[0], p.numel() // p.shape[0]
            if id(p) in experts:  # [E, ...] -> E/ep local experts, sharded over dp
                L = rows // ep
                on_dim0 = expert_shard_dim(L, p.shape[1], dp) == 0
                held += -(-L // dp) * row if on_dim0 else L * row // dp
                whole += L * row if dp > 1 else 0
            elif dense == "fsdp":
                held += -(-rows // world) * row  # FSDP pads dim 0 to a multiple of world
                whole += p.numel() if world > 1 else 0
            else:
                held += p.numel()
        gathered.append(whole)
    # Peak: this block's gathered weights, the next block's (prefetch), this block's grads.
    return Memory(states=16.0 * held, buffers=4.0 * 3 * max(gathered))


def check_info_layout(cfg: Config, world: int, ep: int) -> None:
    """The layout checks of `braid.parallel`, for a layout named on the command line."""
    if ep < 1 or world < 1 or world % ep:
        raise BraidError(f"--world={world} --ep={ep}: world must be a positive multiple of ep")
    if cfg.moe.num_experts % ep:
        raise BraidError(f"--ep={ep} must divide moe.num_experts={cfg.moe.num_experts}")


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
    mem = memory_per_gpu(cfg, world, ep, cfg.parallel.dense)
    n_moe = len(cfg.moe.moe_layer_ids(cfg.model.n_layers))
    lines = [
        f"total parameters      {a.total_params / 1e9:8.3f} B  ({a.total_params:,})",
        f"active per token      {a.active_params / 1e9:8.3f} B  ({a.active_params:,})",
        f"routed experts        {a.expert_params / 1e9:8.3f} B in {n_moe} MoE layers",
        f"train FLOPs / token   {a.flops_per_token / 1e9:8.3f} GFLOP (seq_len {cfg.train.seq_len})",
        f"memory / GPU          {mem.total / 2**30:8.2f} GiB at world={world}, ep={ep}, "
        f"dp={world // ep}, dense={cfg.parallel.dense} (activations not counted)",
        f"  states / buffers    {mem.states / 2**30:8.2f} GiB fp32 weights+grads+Adam, "
        f"{mem.buffers / 2**30:.2f} GiB FSDP gathered weights and grads",
    ]
    return "\n".join(lines)
