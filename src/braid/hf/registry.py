"""Adapters by HF `model_type` (a plain dict: adding an architecture is one file + one line)."""

from __future__ import annotations

from braid.hf.base import Adapter, HFRefusal
from braid.hf.deepseek_v3 import DeepseekV3
from braid.hf.mixtral import Mixtral
from braid.hf.olmoe import Olmoe
from braid.hf.qwen2_moe import Qwen2Moe
from braid.hf.qwen3_moe import Qwen3Moe

# Registry order is the order `auto_adapter` tries on export: the most specific first.
ADAPTERS: dict[str, type[Adapter]] = {
    cls.model_type: cls for cls in (Mixtral, Qwen3Moe, Olmoe, Qwen2Moe, DeepseekV3)
}

# Architectures whose adapter waits for a Braid feature: {model_type: what it needs}.
PENDING: dict[str, str] = {}


def adapter_for(model_type: str, where: str = "config.json") -> Adapter:
    if model_type in PENDING:
        raise HFRefusal(
            f"model_type {model_type} needs {PENDING[model_type]}, which this "
            "braid does not have yet"
        )
    if model_type not in ADAPTERS:
        raise HFRefusal(
            f"{where}: model_type={model_type!r} is not supported; braid imports "
            f"{', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]()


def adapter_by_arch(name: str) -> Adapter:
    """`--arch` accepts a model_type (mixtral) or a class name (MixtralForCausalLM)."""
    for cls in ADAPTERS.values():
        if name in (cls.model_type, cls.architecture):
            return cls()
    names = ", ".join(f"{c.model_type} ({c.architecture})" for c in ADAPTERS.values())
    raise HFRefusal(f"--arch {name!r} is not supported; expected one of {names}")


def auto_adapter(cfg) -> Adapter:
    """The one architecture that computes `cfg`, tried in registry order; the refusal of the
    closest one (by attention and routing family) when none does."""
    errors = []
    for cls in ADAPTERS.values():
        adapter = cls()
        try:
            adapter.hf_config(cfg)
            return adapter
        except HFRefusal as e:
            errors.append(f"{cls.model_type}: {e}")
    raise HFRefusal(
        "no Hugging Face architecture computes this model exactly: " + "; ".join(errors)
    )
