"""Braid's MoE inside Megatron-Core on CPU (gloo): the adapter against Braid's own MoE layer.

One spawn of 2 ranks runs every check, first with expert_model_parallel_size=1, then 2:
  - a GPTModel built with Braid's layer spec holds a BraidMoEAdapter in every layer;
  - the adapter's output on [seq, batch, hidden] equals Braid's MoE on [batch, seq, hidden];
    its gradients (experts, router, shared expert, input) equal those of the reference loss
    out + aux_coef*aux + z_coef*z: the aux losses reach Megatron's backward through
    MoEAuxLossAutoScaler; the tracker holds the unweighted values at the layer's slot;
  - at ep=2 each rank holds half the experts; their gradients equal the reference's over
    both ranks' tokens (the exchange moved the rows), the rest equals the per-rank reference;
  - the spec's `chunks=2` (Braid's chunked overlap) gives the same outputs and gradients;
  - state dicts: a Megatron MoE model's (local spec) maps onto the Braid-spec model and back,
    and Megatron's own expert module computes what Braid's experts compute with the mapped
    weights; the decoder-block spec swaps only the MoE layers of a mixed model;
  - aux-free balancing: Megatron's finalize_model_grads code updates Braid's router bias.
Megatron's own MoELayer is the reference in test_megatron_reference.py; whole models (with
Megatron's attention, which needs CUDA) are compared by benchmarks/megatron_spec.py on a GPU.
"""

import pytest

pytest.importorskip(
    "megatron.core", reason="megatron-core not installed (pip install braid[megatron])"
)

from harness import run_ranks  # noqa: E402

S, B, D, E, K, F_, FS = 6, 2, 16, 4, 2, 8, 12


def _config(ep: int):
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=2,
        hidden_size=D,
        num_attention_heads=2,
        ffn_hidden_size=32,
        num_moe_experts=E,
        moe_router_topk=K,
        moe_ffn_hidden_size=F_,
        moe_shared_expert_intermediate_size=FS,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=0.1,
        moe_z_loss_coeff=0.01,
        expert_model_parallel_size=ep,
        use_cpu_initialization=True,
    )


def _inputs(rank: int):
    import torch

    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(S, B, D, generator=g), torch.randn(S, B, D, generator=g)


def _reference(full_sd, cfg, x_SBD, g_SBD):
    """Braid's own MoE on [B, S, D] with the same weights; loss out.g + coefs * losses."""

    from braid.integrations.megatron import translate
    from braid.model.config import ModelConfig
    from braid.moe.layer import MoE

    mcfg = translate(cfg, ep_size=1)
    ref = MoE(ModelConfig(dim=D), mcfg)
    ref.load_state_dict(full_sd)
    x = x_SBD.transpose(0, 1).clone().requires_grad_(True)
    out, st = ref(x)
    loss = (out * g_SBD.transpose(0, 1)).sum() + mcfg.aux_loss_coef * st.aux_loss
    loss = loss + mcfg.z_loss_coef * st.z_loss
    loss.backward()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    return out.transpose(0, 1).detach(), x.grad.transpose(0, 1), grads, st


def _check(rank, world, ep):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )
    from megatron.core.transformer.spec_utils import build_module

    from braid.integrations.megatron import BraidMoEAdapter, braid_mlp_spec, get_braid_layer_spec

    ps.initialize_model_parallel(1, 1, expert_model_parallel_size=ep)
    torch.manual_seed(0)  # same non-expert weights on both ranks; experts differ by shard
    cfg = _config(ep)
    model = GPTModel(
        config=cfg,
        transformer_layer_spec=get_braid_layer_spec(cfg),
        vocab_size=64,
        max_sequence_length=16,
    )
    mlps = [layer.mlp for layer in model.decoder.layers]
    assert all(isinstance(m, BraidMoEAdapter) for m in mlps)
    assert [m.layer_number for m in mlps] == [1, 2]
    mlp = mlps[1]
    L = E // ep
    assert mlp.moe.experts.w13.shape == (L, D, 2 * F_)
    assert all(p.allreduce == (ep == 1) for p in (mlp.moe.experts.w13, mlp.moe.experts.w2))
    # The full layer (all experts) for the reference: gather the shards in rank order.
    sd = {k: v.detach().clone() for k, v in mlp.moe.state_dict().items()}
    for name in ("experts.w13", "experts.w2"):
        parts = [torch.empty_like(sd[name]) for _ in range(ep)]
        dist.all_gather(parts, sd[name], group=ps.get_expert_model_parallel_group())
        sd[name] = torch.cat(parts)

    clear_aux_losses_tracker()
    x, g = _inputs(rank)
    xa = x.clone().requires_grad_(True)
    out, bias = mlp(xa)
    assert bias is None and out.shape == (S, B, D)
    out.backward(g)  # the aux losses ride on `out`: Megatron's MoEAuxLossAutoScaler
    ref_out, ref_dx, ref_grads, st = _reference(sd, cfg, x, g)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xa.grad, ref_dx, rtol=1e-5, atol=1e-6)
    tracker = get_moe_layer_wise_logging_tracker()
    torch.testing.assert_close(tracker["load_balancing_loss"]["values"][1], st.aux_loss.detach())
    torch.testing.assert_close(tracker["z_loss"]["values"][1], st.z_loss.detach())
    assert tracker["load_balancing_loss"]["values"][0] == 0
    for name in ("router.weight", "shared.w13.weight", "shared.w2.weight"):
        got = dict(mlp.moe.named_parameters())[name].grad
        torch.testing.assert_close(got, ref_grads[name], rtol=1e-5, atol=1e-6)
    # Expert grads: the reference's summed over every rank of the EP group (their tokens
    # reached this rank's experts through the exchange).
    for name in ("experts.w13", "experts.w2"):
        total = ref_grads[name].clone()
        dist.all_reduce(total, group=ps.get_expert_model_parallel_group())
        if ep == 1:
            total = ref_grads[name]
        mine = total[rank % ep * L : (rank % ep + 1) * L] if ep > 1 else total
        torch.testing.assert_close(
            dict(mlp.moe.named_parameters())[name].grad, mine, rtol=1e-5, atol=1e-6
        )
    # Braid's chunked overlap through the spec's keywords: the same numbers, chunk by chunk.
    chunked = build_module(braid_mlp_spec(cfg, chunks=2), config=cfg, layer_number=2)
    assert chunked.moe.overlap is not None and chunked.moe.overlap.chunks == 2
    assert chunked.moe.overlap.chunk_dw == "per_chunk"  # through autograd: DDP's hooks
    chunked.load_state_dict(mlp.state_dict())
    xc = x.clone().requires_grad_(True)
    out_c, _ = chunked(xc)
    out_c.backward(g)
    torch.testing.assert_close(out_c, out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xc.grad, xa.grad, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(chunked.named_parameters(), mlp.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    ps.destroy_model_parallel()
    return True


def _state_dict_roundtrip(rank, world):
    import dataclasses

    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from braid.integrations.megatron import (
        braid_to_megatron,
        get_braid_decoder_block_spec,
        get_braid_layer_spec,
        megatron_to_braid,
    )

    ps.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    cfg = _config(1)
    torch.manual_seed(1)
    theirs = GPTModel(
        config=cfg,
        transformer_layer_spec=get_gpt_layer_local_spec(num_experts=E),
        vocab_size=64,
        max_sequence_length=16,
    )
    ours = GPTModel(
        config=cfg,
        transformer_layer_spec=get_braid_layer_spec(cfg),
        vocab_size=64,
        max_sequence_length=16,
    )
    ours.load_state_dict(megatron_to_braid(theirs.state_dict()), strict=True)
    back = braid_to_megatron(ours.state_dict())
    for k, v in theirs.state_dict().items():
        if not k.endswith("_extra_state"):
            torch.testing.assert_close(back[k], v, rtol=0, atol=0)
    theirs.load_state_dict(back, strict=True)
    # Semantics, not just names: Megatron's expert 2 and Braid's expert 2 on the same rows.
    x = torch.randn(5, D)
    want, _ = theirs.decoder.layers[0].mlp.experts.local_experts[2](x)
    experts = ours.decoder.layers[0].mlp.moe.experts
    got = experts(torch.cat([x.new_zeros(0, D), x]), torch.tensor([0, 0, 5, 0]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    shared_want = theirs.decoder.layers[0].mlp.shared_experts(x[None])
    shared_got = ours.decoder.layers[0].mlp.moe.shared(x[None])
    torch.testing.assert_close(shared_got, shared_want, rtol=1e-5, atol=1e-6)
    # Mixed dense/MoE (moe_layer_freq): the decoder-block spec swaps only the MoE layers.
    mixed = dataclasses.replace(cfg, moe_layer_freq=[0, 1])
    model = GPTModel(
        config=mixed,
        transformer_layer_spec=get_braid_decoder_block_spec(mixed),
        vocab_size=64,
        max_sequence_length=16,
    )
    kinds = [type(layer.mlp).__name__ for layer in model.decoder.layers]
    assert kinds == ["MLP", "BraidMoEAdapter"], kinds
    ps.destroy_model_parallel()
    return True


def _expert_bias(rank, world):
    """Aux-free balancing: the adapter counts this rank's routed tokens under Megatron's name,
    and Megatron's own end-of-step code sums them over data-parallel ranks, moves the bias by
    rate * sign(mean - load) and zeroes the counts."""
    import dataclasses

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed.finalize_model_grads import (
        _update_router_expert_bias,
        reset_model_temporary_tensors,
    )
    from megatron.core.transformer.spec_utils import build_module

    from braid.integrations.megatron import braid_mlp_spec

    ps.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    cfg = dataclasses.replace(
        _config(1), moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=0.01, moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    mlp = build_module(braid_mlp_spec(cfg), config=cfg, layer_number=1)
    router = mlp.moe.router
    x, g = _inputs(rank)
    mlp(x)[0].backward(g)
    # Reference counts: top-k of sigmoid(x W^T) (the bias is still zero), this rank only.
    top = torch.sigmoid(x.reshape(-1, D) @ router.weight.detach().T).topk(K, dim=-1).indices
    counts = torch.bincount(top.flatten(), minlength=E).float()
    torch.testing.assert_close(router.local_tokens_per_expert, counts)
    with torch.no_grad():
        mlp.eval()
        mlp(x)  # evaluation does not count
        mlp.train()
    torch.testing.assert_close(router.local_tokens_per_expert, counts)
    total = counts.clone()
    dist.all_reduce(total)
    _update_router_expert_bias([mlp], cfg)
    reset_model_temporary_tensors(cfg, [mlp])
    torch.testing.assert_close(router.expert_bias, 0.01 * torch.sign(total.mean() - total))
    assert router.local_tokens_per_expert.abs().sum() == 0
    ps.destroy_model_parallel()
    return True


def _all(rank, world):
    return [
        _check(rank, world, 1),
        _check(rank, world, 2),
        _state_dict_roundtrip(rank, world),
        _expert_bias(rank, world),
    ]


def test_megatron_adapter_matches_braid_moe_at_ep1_and_ep2():
    assert run_ranks(_all, 2) == [[True] * 4] * 2
