"""Megatron TransformerConfig -> Braid MoEConfig: the translation table, the refusals, the knobs.

Needs megatron-core (the `megatron` and `test` extras); its CPU-side config imports need no GPU.
"""

import subprocess
import sys

import pytest

pytest.importorskip(
    "megatron.core", reason="megatron-core not installed (pip install braid[megatron])"
)

import torch.nn.functional as F  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402

from braid.errors import BraidError, ConfigError  # noqa: E402
from braid.integrations.megatron import MegatronConfigError, braid_settings, translate  # noqa: E402

BASE = dict(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    ffn_hidden_size=64,
    num_moe_experts=8,
    moe_router_topk=2,
    moe_ffn_hidden_size=16,
    gated_linear_unit=True,
    activation_func=F.silu,
    add_bias_linear=False,
)


def mcfg(**kw):
    return TransformerConfig(**{**BASE, **kw})


# (Megatron overrides, expected MoEConfig fields)
TRANSLATED = [
    (
        {},
        dict(
            num_experts=8,
            top_k=2,
            expert_hidden=16,
            score_func="softmax",
            renormalize=True,
            aux_loss_coef=0.0,
            z_loss_coef=0.0,
            capacity_factor=0.0,
            num_shared_experts=0,
        ),
    ),
    ({"moe_ffn_hidden_size": None}, dict(expert_hidden=64)),
    ({"moe_router_pre_softmax": True}, dict(renormalize=False)),
    ({"moe_router_score_function": "sigmoid"}, dict(score_func="sigmoid", renormalize=True)),
    ({"moe_router_score_function": "sigmoid", "moe_router_topk": 1}, dict(renormalize=False)),
    (
        {"moe_router_load_balancing_type": "aux_loss", "moe_aux_loss_coeff": 0.02},
        dict(aux_loss_coef=0.02),
    ),
    (
        {"moe_router_load_balancing_type": "none", "moe_aux_loss_coeff": 0.02},
        dict(aux_loss_coef=0.0),
    ),
    ({"moe_z_loss_coeff": 1e-3}, dict(z_loss_coef=1e-3)),
    ({"moe_shared_expert_intermediate_size": 48}, dict(num_shared_experts=1, shared_hidden=48)),
    (
        {"moe_expert_capacity_factor": 1.25, "moe_token_drop_policy": "position"},
        dict(capacity_factor=1.25),
    ),
    (
        {
            "moe_router_score_function": "sigmoid",
            "moe_router_enable_expert_bias": True,
            "moe_router_bias_update_rate": 0.01,
        },
        dict(bias_balance=True, bias_update_rate=0.01),
    ),
    ({"moe_token_dispatcher_type": "alltoall", "moe_grouped_gemm": True}, dict(top_k=2)),
]


@pytest.mark.parametrize("overrides,expected", TRANSLATED)
def test_translation_table(overrides, expected):
    moe = translate(mcfg(**overrides))
    assert {k: getattr(moe, k) for k in expected} == expected


# (Megatron overrides, the setting the refusal must name)
REFUSED = [
    ({"add_bias_linear": True}, "add_bias_linear"),
    ({"gated_linear_unit": False}, "gated_linear_unit"),
    ({"activation_func": F.gelu}, "activation_func"),
    (
        {"moe_router_load_balancing_type": "seq_aux_loss", "moe_aux_loss_coeff": 0.01},
        "moe_router_load_balancing_type",
    ),
    ({"moe_router_load_balancing_type": "sinkhorn"}, "moe_router_load_balancing_type"),
    ({"moe_router_topk_scaling_factor": 2.5}, "moe_router_topk_scaling_factor"),
    ({"moe_router_num_groups": 2, "moe_router_group_topk": 1}, "moe_router_num_groups"),
    ({"moe_expert_capacity_factor": 1.0}, "moe_token_drop_policy"),
    (
        {"moe_shared_expert_intermediate_size": 32, "moe_shared_expert_gate": True},
        "moe_shared_expert_gate",
    ),
    ({"moe_input_jitter_eps": 0.01}, "moe_input_jitter_eps"),
    ({"moe_router_dtype": "fp64"}, "moe_router_dtype"),
    ({"expert_model_parallel_size": 3}, "expert_model_parallel_size"),
    (
        {"moe_expert_capacity_factor": 0.0, "moe_token_drop_policy": "position"},
        "moe_expert_capacity_factor",
    ),
    ({"recompute_granularity": "selective", "recompute_modules": ["moe"]}, "recompute_modules"),
]


@pytest.mark.parametrize("overrides,key", REFUSED)
def test_refusals_name_the_setting_in_one_line(overrides, key):
    with pytest.raises(MegatronConfigError) as e:
        translate(mcfg(**overrides))
    msg = str(e.value)
    assert isinstance(e.value, BraidError) and "\n" not in msg
    assert msg.startswith(f"megatron TransformerConfig.{key}="), msg


def test_refusals_of_settings_megatron_validates_together():
    # Settings whose Megatron-side validation needs a GPU or other settings: checked on a copy.
    cfg = mcfg()
    for key, value in [
        ("tensor_model_parallel_size", 2),
        ("fp8", "hybrid"),
        ("context_parallel_size", 2),
        ("num_moe_experts", None),
        ("moe_router_enable_expert_bias", True),
        ("moe_apply_probs_on_input", True),
    ]:
        object.__setattr__(cfg, key, value)
        with pytest.raises(MegatronConfigError, match=f"TransformerConfig.{key}="):
            translate(cfg)
        cfg = mcfg()


def test_braid_knobs_route_to_their_sections():
    s = braid_settings(algorithm="hierarchical", compressor="fp8", chunks=2, expert_impl="loop")
    assert (s.exchange.algorithm, s.exchange.compressor, s.overlap.chunks, s.expert_impl) == (
        "hierarchical",
        "fp8",
        2,
        "loop",
    )


@pytest.mark.parametrize(
    "knobs,key",
    [
        ({"split_dw": True}, "overlap.split_dw"),
        ({"chunks": "auto"}, "overlap.chunks"),
        ({"report": True}, "overlap.report"),
        ({"compressor": "zip"}, "exchange.compressor"),
        ({"algorithm": "carrier_pigeon"}, "exchange.algorithm"),
        ({"chunk": 2}, "chunk"),
    ],
)
def test_braid_knob_refusals(knobs, key):
    with pytest.raises(ConfigError, match=f"config {key}="):
        braid_settings(**knobs)


def test_importing_braid_never_imports_megatron():
    # Every braid module except the Megatron adapter itself (walk_packages would import it to
    # look inside, so the walk is by hand).
    code = (
        "import sys, pkgutil, importlib, braid\n"
        "todo = [(braid.__path__, 'braid.')]\n"
        "while todo:\n"
        "    path, prefix = todo.pop()\n"
        "    for m in pkgutil.iter_modules(path, prefix):\n"
        "        if m.name in ('braid.integrations.megatron', 'braid.__main__'):\n"
        "            continue\n"
        "        mod = importlib.import_module(m.name)\n"
        "        if m.ispkg:\n"
        "            todo.append((mod.__path__, m.name + '.'))\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] == 'megatron')\n"
        "assert 'braid.moe.layer' in sys.modules and not bad, bad[:3]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=240)


def test_without_megatron_the_adapter_import_fails_in_one_line():
    code = (
        "import sys\n"
        "sys.modules['megatron'] = None  # as if megatron-core were not installed\n"
        "from braid.errors import BraidError\n"
        "try:\n"
        "    import braid.integrations.megatron\n"
        "except BraidError as e:\n"
        "    assert \"pip install 'braid[megatron]'\" in str(e) and '\\n' not in str(e), e\n"
        "else:\n"
        "    raise AssertionError('imported')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_state_dict_keeps_the_expert_bias_and_transposes_the_experts():
    import torch

    from braid.integrations.megatron import braid_to_megatron, megatron_to_braid

    g = torch.Generator().manual_seed(0)
    p = "decoder.layers.0.mlp."
    theirs = {
        "decoder.layers.0.self_attention.linear_qkv.weight": torch.randn(6, 4, generator=g),
        p + "router.weight": torch.randn(2, 4, generator=g),
        p + "router.expert_bias": torch.tensor([0.5, -0.25]),
    }
    for i in range(2):
        theirs[f"{p}experts.local_experts.{i}.linear_fc1.weight"] = torch.randn(6, 4, generator=g)
        theirs[f"{p}experts.local_experts.{i}.linear_fc2.weight"] = torch.randn(4, 3, generator=g)
    ours = megatron_to_braid(theirs)
    assert torch.equal(ours[p + "moe.router.expert_bias"], torch.tensor([0.5, -0.25]))
    assert torch.equal(
        ours[p + "moe.experts.w13"][1], theirs[f"{p}experts.local_experts.1.linear_fc1.weight"].t()
    )
    assert torch.equal(
        ours[p + "moe.experts.w2"][0], theirs[f"{p}experts.local_experts.0.linear_fc2.weight"].t()
    )
    back = braid_to_megatron(ours, expert_bias=True)
    assert back.keys() == theirs.keys()
    assert all(torch.equal(back[k], v) for k, v in theirs.items())
