"""Model arithmetic from the config alone: parameters, active parameters, FLOPs, memory per GPU.

Counts match the built model exactly (a test compares them with `sum(p.numel())`).
Training FLOPs per token follow PaLM (appendix B): 6 * (active matmul parameters) for the
forward and backward GEMMs, plus the causal half of PaLM's 12 * L * (H * Dh) * T for attention
scores and values (6 * n_layers * dim * seq_len for the plain block; a windowed layer counts the
keys its window keeps). The KV cache per token is what generation stores (MLA: its latent and
RoPE key) at the compute dtype (bf16 unless train.dtype = fp32), next to the per-head k/v cache
that multi-head attention with the same heads would store.

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
from braid.model.config import ModelConfig
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


def attention_params(m: ModelConfig) -> tuple[int, int]:
    """(matmul weights and biases, norm weights) of one attention layer (GQA or MLA)."""
    D, H = m.dim, m.n_heads
    if m.attention == "mla":
        q_width = H * (m.qk_nope_head_dim + m.qk_rope_head_dim)
        q = D * q_width if m.q_lora_rank == 0 else m.q_lora_rank * (D + q_width)
        kv = D * (m.kv_lora_rank + m.qk_rope_head_dim)
        kv += m.kv_lora_rank * H * (m.qk_nope_head_dim + m.v_head_dim)
        return q + kv + H * m.v_head_dim * D, m.q_lora_rank + m.kv_lora_rank
    q_width, kv_width = H * m.attn_head_dim, m.kv_heads * m.attn_head_dim
    matmul = D * q_width + 2 * D * kv_width + q_width * D
    matmul += (q_width + 2 * kv_width) if m.qkv_bias else 0
    norms = {"none": 0, "head": 2 * m.attn_head_dim, "full": q_width + kv_width}[m.qk_norm]
    return matmul, norms


def attention_score_flops(m: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of q.k and p.v (PaLM's 12 * T * (H * Dh) per layer, halved for
    causality); a windowed layer sees at most `window` keys."""
    if m.attention == "mla":
        qk, v = m.n_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim), m.n_heads * m.v_head_dim
    else:
        qk = v = m.n_heads * m.attn_head_dim
    total = 0.0
    for i in range(m.n_layers):
        w = m.window_for(i)
        keys = seq_len / 2 if w == 0 or w >= seq_len else w * (1 - w / (2 * seq_len))
        total += 6.0 * keys * (qk + v)
    return total


def kv_cache_bytes_per_token(m: ModelConfig, dtype_bytes: int) -> tuple[int, int]:
    """(bytes this model caches per token per layer, bytes a per-head k/v cache would take):
    MLA keeps its latent and RoPE key; GQA keeps k and v of each kv head."""
    if m.attention == "mla":
        per_head = m.n_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
        return dtype_bytes * (m.kv_lora_rank + m.qk_rope_head_dim), dtype_bytes * per_head
    gqa = 2 * m.kv_heads * m.attn_head_dim
    return dtype_bytes * gqa, dtype_bytes * 2 * m.n_heads * m.attn_head_dim


def kv_cache_line(cfg: Config) -> str:
    m = cfg.model
    dtype, size = ("fp32", 4) if cfg.train.dtype == "fp32" else ("bf16", 2)
    cached, per_head = kv_cache_bytes_per_token(m, size)
    kind = "latent + rope key" if m.attention == "mla" else f"k/v of {m.kv_heads} kv heads"
    return (
        f"KV cache / token      {cached:8,d} B per layer, {cached * m.n_layers / 1024:.1f} KiB "
        f"all {m.n_layers} layers ({kind}, {dtype}); per-head k/v of {m.n_heads} heads: "
        f"{per_head:,d} B per layer, {per_head * m.n_layers / 1024:.1f} KiB"
    )


def arithmetic(cfg: Config, seq_len: int | None = None) -> ModelArithmetic:
    m, moe = cfg.model, cfg.moe
    seq_len = seq_len or cfg.train.seq_len
    D = m.dim
    attn, attn_norms = attention_params(m)
    norms = 2 * D + attn_norms  # block norms and qk-/latent norms
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
    flops = 6.0 * active_matmul + attention_score_flops(m, seq_len)
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
        kv_cache_line(cfg),
    ]
    return "\n".join(lines)
