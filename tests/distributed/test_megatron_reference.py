"""Megatron-Core's own MoELayer is the reference: the adapter computes what it computes.

On CPU Megatron's MoELayer runs with two concessions that leave its arithmetic alone, made in
the spawned workers only: `torch.cuda.current_device` answers "cpu" (Megatron's router moves its
weight to the current CUDA device on every forward), and megatron-core 0.16's router GEMM reads
a `te_general_gemm` name that exists only with Transformer Engine (0.19 sets it to None
without TE; so do we). Its allgather dispatcher and SequentialMLP then run on gloo.
One spawn of 2 ranks, fp32, every routing variant below at expert_model_parallel_size 1 and the
ones in EP2 at 2:
Megatron's layer and BraidMoEAdapter, on the same weights (`megatron_to_braid`) and the same
[seq, batch, hidden] input, give the same output, input gradient, router/expert/shared-expert
gradients (the aux and z losses included, through Megatron's MoEAuxLossAutoScaler) and the
same values in Megatron's aux-loss tracker. (Capacity is compared where nothing is dropped:
Megatron's "position" drop policy keeps an unordered top-k of positions; Braid the earliest.)
"""

import pytest

pytest.importorskip(
    "megatron.core", reason="megatron-core not installed (pip install braid[megatron])"
)

from harness import run_ranks  # noqa: E402

S, B, D, E = 6, 3, 32, 4

VARIANTS = {
    "softmax_aux_z": {},
    "shared_expert": dict(moe_shared_expert_intermediate_size=24),
    "pre_softmax": dict(moe_router_pre_softmax=True),
    "sigmoid": dict(moe_router_score_function="sigmoid"),
    "sigmoid_top1": dict(moe_router_score_function="sigmoid", moe_router_topk=1),
    "no_balancing": dict(moe_router_load_balancing_type="none", moe_z_loss_coeff=None),
    "per_token_loss": dict(calculate_per_token_loss=True),
    "capacity_no_drop": dict(moe_expert_capacity_factor=4.0, moe_token_drop_policy="position"),
    "expert_bias": dict(
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_load_balancing_type="none",
    ),
}


# At ep=2 the variants that change what crosses the exchange (the routing itself is per rank).
EP2 = ("softmax_aux_z", "shared_expert", "sigmoid", "capacity_no_drop")
PLAN = [(1, name) for name in VARIANTS] + [(2, name) for name in EP2]


def _cpu_megatron():
    import torch

    torch.cuda.current_device = lambda: "cpu"
    import megatron.core.transformer.moe.moe_utils as mu

    if not hasattr(mu, "te_general_gemm"):
        mu.te_general_gemm = None


def _compare(rank, ep, overrides):
    import torch
    import torch.nn.functional as F
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )
    from megatron.core.transformer.spec_utils import build_module

    from braid.integrations.megatron import braid_mlp_spec, megatron_to_braid

    cfg = TransformerConfig(
        **{
            **dict(
                num_layers=1, hidden_size=D, num_attention_heads=4, ffn_hidden_size=64,
                moe_ffn_hidden_size=16, num_moe_experts=E, moe_router_topk=2,
                gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
                moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01, use_cpu_initialization=True,
                moe_token_dispatcher_type="allgather", expert_model_parallel_size=ep,
            ),
            **overrides,
        }
    )  # fmt: skip
    torch.manual_seed(rank)  # each EP rank draws its own experts
    theirs = get_moe_module_spec(use_te=False, num_experts=E)(config=cfg)
    theirs.set_layer_number(1)
    if cfg.moe_router_enable_expert_bias:  # a bias that changes routing
        with torch.no_grad():
            theirs.router.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    ours = build_module(braid_mlp_spec(cfg), config=cfg, layer_number=1)
    sd = megatron_to_braid({"mlp." + k: v for k, v in theirs.state_dict().items()})
    ours.load_state_dict({k[len("mlp.") :]: v for k, v in sd.items()}, strict=True)
    gen = torch.Generator().manual_seed(100 + rank)
    x, g = torch.randn(S, B, D, generator=gen), torch.randn(S, B, D, generator=gen)
    got = []
    for layer in (theirs, ours):
        clear_aux_losses_tracker()
        xl = x.clone().requires_grad_(True)
        y, bias = layer(xl)
        assert bias is None
        y.backward(g)
        tracked = {k: v["values"].clone() for k, v in get_moe_layer_wise_logging_tracker().items()}
        got.append((y.detach(), xl.grad, tracked))
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1][0], got[0][0], **close)
    torch.testing.assert_close(got[1][1], got[0][1], **close)
    nonzero = {k: v for k, v in got[0][2].items() if v.abs().sum() > 0}
    assert set(nonzero) <= set(got[1][2]), (sorted(got[0][2]), sorted(got[1][2]))
    for k, v in nonzero.items():
        torch.testing.assert_close(got[1][2][k], v, **close)
    grads = {k: p.grad for k, p in ours.named_parameters()}
    torch.testing.assert_close(grads["moe.router.weight"], theirs.router.weight.grad, **close)
    for i, e in enumerate(theirs.experts.local_experts):
        torch.testing.assert_close(grads["moe.experts.w13"][i].T, e.linear_fc1.weight.grad, **close)
        torch.testing.assert_close(grads["moe.experts.w2"][i].T, e.linear_fc2.weight.grad, **close)
    if theirs.shared_experts is not None:
        sh = theirs.shared_experts
        torch.testing.assert_close(
            grads["moe.shared.w13.weight"], sh.linear_fc1.weight.grad, **close
        )
        torch.testing.assert_close(
            grads["moe.shared.w2.weight"], sh.linear_fc2.weight.grad, **close
        )


def _all(rank, world):
    _cpu_megatron()
    from megatron.core import parallel_state as ps

    done = []
    for ep in (1, 2):
        ps.initialize_model_parallel(1, 1, expert_model_parallel_size=ep)
        for name in (n for e, n in PLAN if e == ep):
            try:
                _compare(rank, ep, VARIANTS[name])
            except AssertionError as e:
                raise AssertionError(f"ep={ep} {name}: {e}") from e
            done.append((ep, name))
        ps.destroy_model_parallel()
    return done


def test_adapter_matches_megatrons_own_moe_layer_at_ep1_and_ep2():
    assert run_ranks(_all, 2) == [PLAN, PLAN]
