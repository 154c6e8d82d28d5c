"""Builders for the peers `benchmarks/peers.py` measures Braid against, each behind one function.

Every builder returns `(module, forward)` or raises `PeerMissing` with the reason (the peer is not
installed, or cannot be built here); the caller records the reason and goes on. Peers:
- torchtitan (`pip install torchtitan==0.3.0`): its MoE layer (token-choice top-k router,
  local token dispatcher, grouped_mm experts) and its Qwen3 decoder with MoE blocks;
- Megatron-Core (`pip install megatron-core==0.19.2`): MoELayer from the local (non-Transformer
  Engine) spec, SequentialMLP experts, alltoall dispatcher, one rank.
Nothing here is imported by the package or its tests, except `braid_layer` and `PeerMissing`.

Shape legend: E experts, K experts per token, H model dim, F expert hidden size.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PEER_PACKAGES = {"torchtitan": "torchtitan", "mcore": "megatron-core"}


class PeerMissing(Exception):
    """A peer that cannot run here; the message says why."""


def peer_version(peer: str) -> str | None:
    """Installed version of a peer's distribution (None when absent)."""
    try:
        return importlib.metadata.version(PEER_PACKAGES[peer])
    except importlib.metadata.PackageNotFoundError:
        return None


def _require(peer: str) -> None:
    if peer_version(peer) is None:
        raise PeerMissing(f"{PEER_PACKAGES[peer]} is not installed")


def braid_layer(s: dict, device: torch.device, dtype: torch.dtype):
    from braid.model.config import ModelConfig
    from braid.moe.config import MoEConfig
    from braid.moe.layer import MoE

    cfg = MoEConfig(
        num_experts=s["E"], top_k=s["K"], expert_hidden=s["F"], aux_loss_coef=0.0, z_loss_coef=0.0
    )
    m = MoE(ModelConfig(dim=s["H"]), cfg).to(device, dtype)
    return m, lambda x_BTD: m(x_BTD)[0]


def titan_layer(s: dict, device: torch.device, dtype: torch.dtype):
    _require("torchtitan")
    if device.type != "cuda":
        raise PeerMissing("torchtitan's grouped experts cast to bf16 and need CUDA")
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import (
        GroupedExperts,
        MoE,
        RoutedExperts,
        TokenChoiceTopKRouter,
    )
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    cfg = MoE.Config(
        num_experts=s["E"],
        load_balance_coeff=None,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=s["H"], hidden_dim=s["F"], num_experts=s["E"]),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=s["E"], top_k=s["K"]),
        ),
        router=TokenChoiceTopKRouter.Config(
            num_experts=s["E"],
            top_k=s["K"],
            score_func="softmax",
            route_norm=True,
            gate=Linear.Config(in_features=s["H"], out_features=s["E"]),
        ),
    )
    m = cfg.build().to(device, dtype)
    return m, lambda x_BTD: m(x_BTD)


def mcore_layer(s: dict, device: torch.device, dtype: torch.dtype):
    _require("mcore")
    if device.type != "cuda":
        raise PeerMissing("Megatron-Core's MoELayer needs CUDA and NCCL")
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer import TransformerConfig

    if not dist.is_initialized():  # Megatron wants its parallel state even on one rank
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29581")
        dist.init_process_group("nccl", rank=0, world_size=1)
        ps.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=s["H"],
        num_attention_heads=16,
        ffn_hidden_size=s["F"],
        moe_ffn_hidden_size=s["F"],
        num_moe_experts=s["E"],
        moe_router_topk=s["K"],
        expert_model_parallel_size=1,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        moe_router_load_balancing_type="none",
    )
    spec = get_moe_module_spec(use_te=False, num_experts=s["E"], moe_grouped_gemm=False)
    m = spec(config=cfg).to(device)

    def forward(x_BTD: Tensor) -> Tensor:  # Megatron is sequence-first: [T, B, H]
        out = m(x_BTD.transpose(0, 1))
        return (out[0] if isinstance(out, tuple) else out).transpose(0, 1)

    return m, forward


LAYERS: dict[str, Callable] = {
    "braid": braid_layer,
    "torchtitan": titan_layer,
    "mcore": mcore_layer,
}


def router_weight(m: nn.Module, E: int, H: int) -> nn.Parameter:
    """The one [E, H] parameter of a layer: its router (the experts' shapes never match)."""
    hits = [p for p in m.parameters() if tuple(p.shape) == (E, H)]
    if len(hits) != 1:
        raise PeerMissing(f"found {len(hits)} parameters of the router's shape [{E}, {H}]")
    return hits[0]


def _titan_on_older_torch() -> None:
    """torchtitan 0.3.0's FSDP helpers import `torch.distributed.fsdp.DataParallelMeshDims`
    (newer than torch 2.11) only to annotate their signatures, and `torchtitan.models.qwen3` imports
    them. The one-GPU model never calls them: a placeholder name lets the model import on
    torch 2.11. Nothing else is changed."""
    import torch.distributed.fsdp as fsdp

    if not hasattr(fsdp, "DataParallelMeshDims"):
        fsdp.DataParallelMeshDims = type("DataParallelMeshDims", (), {})


def titan_qwen3(cfg, device: torch.device) -> nn.Module:
    """torchtitan's Qwen3 decoder with MoE blocks in the shape of a Braid config: every layer
    MoE, softmax top-k with renormalised gates, no balancing loss, no QK-norm (Braid has none),
    causal SDPA, untied embeddings. Built on `device` in fp32 (autocast does the rest)."""
    _require("torchtitan")
    _titan_on_older_torch()
    from torchtitan.models.common import CosSinRoPE, Embedding, Linear
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.common.config_utils import (
        make_gqa_config,
        make_moe_config,
        make_routed_experts_config,
        make_router_config,
    )
    from torchtitan.models.common.nn_modules import RMSNorm
    from torchtitan.models.qwen3 import Qwen3Model
    from torchtitan.models.qwen3.model import Qwen3TransformerBlock

    mc, moe = cfg.model, cfg.moe

    def normal(t):
        return torch.nn.init.normal_(t, std=mc.init_std)

    # One initializer table for every module (torchtitan looks parameters up by name).
    init = {
        "weight": normal,
        "bias": torch.nn.init.zeros_,
        "w1_EFD": normal,
        "w2_EDF": normal,
        "w3_EFD": normal,
    }

    def norm(dim):
        return RMSNorm.Config(
            normalized_shape=dim, eps=mc.norm_eps, param_init={"weight": torch.nn.init.ones_}
        )

    rope = CosSinRoPE.Config(dim=mc.attn_head_dim, max_seq_len=mc.max_seq_len, theta=mc.rope_theta)
    blocks = [
        Qwen3TransformerBlock.Config(
            attention_norm=norm(mc.dim),
            ffn_norm=norm(mc.dim),
            attention=make_gqa_config(
                dim=mc.dim,
                n_heads=mc.n_heads,
                n_kv_heads=mc.kv_heads,
                head_dim=mc.attn_head_dim,
                wqkv_param_init=init,
                wo_param_init=init,
                fuse_qkv=True,
                rope=rope,
                inner_attention=ScaledDotProductAttention.Config(),
                qk_norm=None,
            ),
            moe=make_moe_config(
                num_experts=moe.num_experts,
                load_balance_coeff=None,
                router=make_router_config(
                    dim=mc.dim,
                    num_experts=moe.num_experts,
                    gate_param_init=init,
                    top_k=moe.top_k,
                    score_func="softmax",
                    route_norm=True,
                ),
                routed_experts=make_routed_experts_config(
                    dim=mc.dim,
                    hidden_dim=moe.expert_hidden,
                    num_experts=moe.num_experts,
                    top_k=moe.top_k,
                    param_init=init,
                    comm_backend="standard",
                ),
            ),
        )
        for _ in range(mc.n_layers)
    ]
    tcfg = Qwen3Model.Config(
        vocab_size=mc.vocab_size,
        dim=mc.dim,
        norm=norm(mc.dim),
        tok_embeddings=Embedding.Config(
            num_embeddings=mc.vocab_size, embedding_dim=mc.dim, param_init=init
        ),
        lm_head=Linear.Config(in_features=mc.dim, out_features=mc.vocab_size, param_init=init),
        layers=blocks,
    )
    with torch.device(device):
        model = tcfg.build()
    model.init_states(buffer_device=device)
    return model


def braid_step_config(preset: str, seq: int, compile_: bool, cuda_graphs: bool = False):
    """A Braid config from `preset`, reshaped to what torchtitan's Qwen3 MoE can express."""
    from braid.config import load_config

    b = str(compile_).lower()
    return load_config(
        preset,
        [
            f"--train.seq_len={seq}",
            f"--train.compile={b}",
            "--parallel.ep=1",
            f"--train.cuda_graphs={str(cuda_graphs).lower()}",
            "--moe.first_k_dense=0",
            "--moe.every=1",
            "--moe.num_shared_experts=0",
            "--moe.score_func=softmax",
            "--moe.bias_balance=false",
            "--moe.aux_loss_coef=0",
            "--moe.z_loss_coef=0",
            "--model.tie_embeddings=false",
        ],
    )
