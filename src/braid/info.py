"""Model arithmetic from the config alone: parameters, active parameters, FLOPs, memory per GPU.

Counts are read from the model built on the meta device (no memory, milliseconds even for
dsv3), so every architecture option is counted as it is built. Parameter counts are the main
model's, as model cards report them; the MTP modules' own weights are reported apart.
Training FLOPs per token follow PaLM (appendix B): 6 * (active matmul parameters) for the
forward and backward GEMMs, plus the causal half of PaLM's 12 * L * (qk + v)/2 * T for attention
scores and values, qk and v the query-key and value widths over all heads (6 * n_layers * dim *
seq_len for the plain block; MLA: heads * (nope + rope) and heads * v_head_dim; a windowed
layer counts the keys its window keeps). MTP modules add their block, projection and one more
output-head GEMM per depth. The KV cache per token is what generation stores (MLA: its latent
and RoPE key) at the compute dtype (bf16 unless train.dtype = fp32), next to the per-head k/v
cache that multi-head attention with the same heads would store.

Memory per GPU (`memory_per_gpu`) follows the layout `braid.parallel` builds, tensor by tensor
from the model built on the meta device (no memory), for the rank that holds the most:
  - states: fp32 weights, fp32 grads and Adam's two fp32 moments, 16 bytes per element held.
    dense=fsdp: each dense tensor sharded on dim 0 over all ranks (FSDP pads dim 0 to a multiple
    of world, so rank 0 holds ceil(rows/world) rows); dense=replicate: every dense tensor whole.
    Experts: E/ep per rank, sharded over dp on the dim `expert_shard_dim` picks (ceil on dim 0);
  - FSDP buffers: while a block runs, its sharded tensors are all-gathered whole (fp32, as
    weights stay fp32 under autocast; bf16 with parallel.param_dtype=bf16), the next block's
    are prefetched, and in backward its whole grads exist until the reduce-scatter (bf16, plus
    the fp32 copy that is reduced, with param_dtype=bf16): about 3 x the largest block's
    gathered tensors, 12 bytes an element in fp32, 10 with bf16 compute weights.
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
    flops_per_token: float  # training (forward + backward), MTP modules included
    mtp_params: int = 0  # the MTP modules' own weights (not in total_params)


GPU_BYTES = 80 * 2**30  # the 80 GiB of an H100/A100-80G: `braid info` looks for a layout that fits


@dataclass(frozen=True)
class Memory:
    states: float  # bytes of fp32 weights + grads + Adam moments held by the fullest rank
    buffers: float  # bytes of FSDP all-gathered weights and unreduced grads at the peak

    @property
    def total(self) -> float:
        return self.states + self.buffers


def memory_per_gpu(cfg: Config, world: int, ep: int, dense: str = "fsdp", model=None) -> Memory:
    """Bytes per GPU under (world, ep, dense); see the module docstring for what is counted.
    `model`: the meta-built model, when the caller has one already."""
    from braid.moe.experts import GroupedExperts
    from braid.parallel.data import fsdp_units

    check_info_layout(cfg, world, ep)
    dp = world // ep
    model = model if model is not None else build_meta(cfg)
    experts = {
        id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()
    }
    # The dense FSDP units (blocks, MTP modules, an untied embedding and head); the rest is the
    # root's. With dense=replicate nothing is gathered, so the grouping does not matter.
    units = fsdp_units(model)
    in_unit = {id(p) for u in units for p in u.parameters()}
    root = [p for p in model.parameters() if id(p) not in in_unit]
    held, gathered = 0, []  # elements this rank holds; elements each FSDP block gathers whole
    for params in [root] + [list(u.parameters()) for u in units]:
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
    # parallel.param_dtype=bf16: weights gathered in bf16 (2 + 2 bytes), grads computed in bf16
    # and copied to fp32 for the reduce-scatter (2 + 4); fp32: 4 + 4 + 4. States are the same.
    per_elem = 10.0 if cfg.parallel.param_dtype == "bf16" else 12.0
    return Memory(states=16.0 * held, buffers=per_elem * max(gathered))


def smallest_fitting_layout(
    cfg: Config, budget: float, max_world: int = 16384
) -> tuple[int, int, Memory] | None:
    """(world, ep, memory) of the fewest GPUs whose memory per GPU (`memory_per_gpu`, with
    parallel.dense and param_dtype as configured) is at most `budget` bytes; the largest ep
    among equals (fewer experts per rank). None if no world up to max_world fits."""
    model = build_meta(cfg)
    states_total = 16.0 * sum(p.numel() for p in model.parameters())
    E = max(cfg.moe.num_experts, 1)
    eps = [d for d in range(1, E + 1) if E % d == 0]
    world = max(1, int(states_total // budget))  # below this even perfect sharding cannot fit
    while world <= max_world:
        for ep in reversed([d for d in eps if world % d == 0]):
            mem = memory_per_gpu(cfg, world, ep, cfg.parallel.dense, model)
            if mem.total <= budget:
                return world, ep, mem
        world += 1
    return None


def check_info_layout(cfg: Config, world: int, ep: int) -> None:
    """The layout checks of `braid.parallel`, for a layout named on the command line."""
    if ep < 1 or world < 1 or world % ep:
        raise BraidError(f"--world={world} --ep={ep}: world must be a positive multiple of ep")
    if cfg.moe.num_experts % ep:
        raise BraidError(f"--ep={ep} must divide moe.num_experts={cfg.moe.num_experts}")


def attention_score_flops(m: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of q.k and p.v (PaLM's 12 * T * (H * Dh) per layer, halved for
    causality), MTP blocks included; a windowed layer sees at most `window` keys."""
    if m.attention == "mla":
        qk, v = m.n_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim), m.n_heads * m.v_head_dim
    else:
        qk = v = m.n_heads * m.attn_head_dim
    total = 0.0
    # The MTP blocks attend like the last layer (braid.model.transformer builds them so).
    for i in [*range(m.n_layers), *[m.n_layers - 1] * m.mtp_depth]:
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


def build_meta(cfg: Config):
    """The model on the meta device: exact shapes, no memory (the counts below read it)."""
    import torch

    from braid.model.transformer import Transformer

    with torch.device("meta"):
        return Transformer(cfg.model, cfg.moe)


def arithmetic(cfg: Config, seq_len: int | None = None) -> ModelArithmetic:
    """Counts read from the model built on the meta device, so every option (MLA, biases, gates,
    MTP) is counted as built. Total/active/experts are the main model's (what model cards
    report); `mtp_params` are the MTP modules' own weights (embedding and head are shared)."""
    from braid.moe.layer import MoE

    m = cfg.model
    seq_len = seq_len or cfg.train.seq_len
    model = build_meta(cfg)
    main = {n: p.numel() for n, p in model.named_parameters() if not n.startswith("mtp.")}
    mtp_names = {n for n, _ in model.named_parameters() if n.startswith("mtp.")}
    total, mtp_total = (
        sum(main.values()),
        sum(p.numel() for n, p in model.named_parameters() if n in mtp_names),
    )
    expert_names, idle = set(), {"main": 0, "mtp": 0}
    for name, mod in model.named_modules():
        if isinstance(mod, MoE):
            e_numel = sum(p.numel() for p in mod.experts.parameters())
            expert_names |= {f"{name}.experts.{n}" for n, _ in mod.experts.named_parameters()}
            spare = e_numel * (mod.cfg.num_experts - mod.cfg.top_k) // mod.cfg.num_experts
            idle["mtp" if name.startswith("mtp.") else "main"] += spare
    experts_total = sum(v for n, v in main.items() if n in expert_names)
    emb = main["tok_emb.weight"] + main.get("output.weight", 0)
    active = total - idle["main"]

    # GEMM weights a token goes through: 2-D weights, less the input lookup when the head is a
    # separate matrix (with tied embeddings the one matrix is the output GEMM, so it counts).
    def gemm(names) -> int:
        dims = dict(model.named_parameters())
        return sum(dims[n].numel() for n in names if dims[n].dim() >= 2)

    lookup = main["tok_emb.weight"] if "output.weight" in main else 0
    head = m.vocab_size * m.dim
    active_gemm = gemm(main) - lookup - idle["main"]
    mtp_gemm = gemm(mtp_names) - idle["mtp"] + m.mtp_depth * head  # each depth runs the head
    flops = 6.0 * (active_gemm + mtp_gemm) + attention_score_flops(m, seq_len)
    return ModelArithmetic(
        total_params=total,
        active_params=active,
        embedding_params=emb,
        expert_params=experts_total,
        dense_params=total - experts_total,
        flops_per_token=flops,
        mtp_params=mtp_total,
    )


def describe(cfg: Config, world: int | None = None, ep: int | None = None) -> str:
    ep = ep or cfg.parallel.ep
    world = world or ep
    a = arithmetic(cfg)
    mem = memory_per_gpu(cfg, world, ep, cfg.parallel.dense)
    fit = None
    if mem.total > GPU_BYTES:
        fit = smallest_fitting_layout(cfg, GPU_BYTES)
    n_moe = len(cfg.moe.moe_layer_ids(cfg.model.n_layers))
    lines = [
        f"total parameters      {a.total_params / 1e9:8.3f} B  ({a.total_params:,})",
        *(
            [
                f"  with MTP modules    {(a.total_params + a.mtp_params) / 1e9:8.3f} B  "
                f"(+{a.mtp_params / 1e9:.3f} B in {cfg.model.mtp_depth} MTP module(s), "
                f"sharing the embedding and output head)"
            ]
            if a.mtp_params
            else []
        ),
        f"active per token      {a.active_params / 1e9:8.3f} B  ({a.active_params:,})",
        f"routed experts        {a.expert_params / 1e9:8.3f} B in {n_moe} MoE layers",
        f"train FLOPs / token   {a.flops_per_token / 1e9:8.3f} GFLOP (seq_len {cfg.train.seq_len})",
        f"memory / GPU          {mem.total / 2**30:8.2f} GiB at world={world}, ep={ep}, "
        f"dp={world // ep}, dense={cfg.parallel.dense} (activations not counted)",
        f"  states / buffers    {mem.states / 2**30:8.2f} GiB fp32 weights+grads+Adam, "
        f"{mem.buffers / 2**30:.2f} GiB FSDP gathered weights and grads "
        f"(param_dtype {cfg.parallel.param_dtype})",
        kv_cache_line(cfg),
    ]
    if mem.total > GPU_BYTES:
        if fit is None:
            lines.append(f"fits {GPU_BYTES / 2**30:.0f} GiB / GPU   on no layout up to 16384 GPUs")
        else:
            w, e, m = fit
            lines.append(
                f"fits {GPU_BYTES / 2**30:.0f} GiB / GPU   from world={w} (ep={e}, dp={w // e}): "
                f"{m.total / 2**30:.2f} GiB ({m.states / 2**30:.2f} states + "
                f"{m.buffers / 2**30:.2f} buffers); `braid info --world {w} --ep {e}`"
            )
    return "\n".join(lines)
