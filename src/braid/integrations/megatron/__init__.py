"""Braid's MoE layer inside Megatron-Core, through Megatron's layer-spec mechanism.

A Megatron user writes (the rest of the training script stays Megatron's):

    from braid.integrations.megatron import get_braid_layer_spec
    config = TransformerConfig(..., num_moe_experts=8, moe_router_topk=2, add_bias_linear=False,
                               gated_linear_unit=True, activation_func=F.silu)
    spec = get_braid_layer_spec(config, algorithm="nccl", compressor="fp8", chunks=2)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=V,
                     max_sequence_length=S)

`get_braid_layer_spec` returns Megatron's own GPT layer spec with the MoE MLP replaced by
`BraidMoEAdapter` (adapter.py): Megatron's config translated to Braid's (translate.py, which
refuses in one line what it cannot translate), Megatron's expert-parallel group carrying Braid's
exchange, [seq, batch, hidden] in, (output, None) out, the aux losses handed to Megatron's
tracking. `megatron_to_braid` / `braid_to_megatron` (state_dict.py) map state dicts between a
model built with Megatron's MoE layer and one built with Braid's. Needs `pip install
'braid[megatron]'`; `import braid` never imports Megatron. See docs/megatron.md.
"""

from __future__ import annotations

try:
    import megatron.core  # noqa: F401
except ImportError as e:  # one line with the fix, not a traceback into Megatron's imports
    from braid.errors import BraidError

    raise BraidError(
        f"braid.integrations.megatron needs megatron-core ({e}); pip install 'braid[megatron]'"
    ) from None

from braid.integrations.megatron.adapter import BraidMoEAdapter, BraidSettings
from braid.integrations.megatron.spec import (
    braid_mlp_spec,
    braid_settings,
    get_braid_decoder_block_spec,
    get_braid_layer_spec,
)
from braid.integrations.megatron.state_dict import braid_to_megatron, megatron_to_braid
from braid.integrations.megatron.translate import MegatronConfigError, translate

__all__ = [
    "BraidMoEAdapter",
    "BraidSettings",
    "MegatronConfigError",
    "braid_mlp_spec",
    "braid_settings",
    "braid_to_megatron",
    "get_braid_decoder_block_spec",
    "get_braid_layer_spec",
    "megatron_to_braid",
    "translate",
]
