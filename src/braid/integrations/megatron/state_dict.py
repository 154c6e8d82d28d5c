"""State-dict mapping between Megatron-Core's MoELayer and Braid's adapter (same weights).

Works on whole-model state dicts: keys outside a MoE MLP pass through unchanged; inside one
(`<prefix>mlp.`) the tensors are renamed and laid out as the other side stores them. Expert
indices are this rank's local ones on both sides, so each expert-parallel rank maps its own.

  Megatron (<prefix>mlp.)                              Braid adapter (<prefix>mlp.moe.)
  router.weight [E, D]                                 router.weight [E, D]
  router.expert_bias [E] (aux-free balancing only)     router.expert_bias [E] (zeros otherwise)
  experts.local_experts.{i}.linear_fc1.weight [2F, D]  experts.w13[i] = its transpose [D, 2F]
  experts.local_experts.{i}.linear_fc2.weight [D, F]   experts.w2[i] = its transpose [F, D]
  shared_experts.linear_fc1.weight [2Fs, D]            shared.w13.weight [2Fs, D]
  shared_experts.linear_fc2.weight [D, Fs]             shared.w2.weight [D, Fs]
The experts may also be in Transformer Engine's grouped layout (`experts.linear_fc1.weight{i}`,
same shapes as the local ones); the legacy GroupedMLP layout is not read. fc1's rows are
[gate; up] in Megatron's GLU and w13's columns [gate | up] in Braid's SwiGLU, so a transpose is
the whole conversion. Transformer Engine's `_extra_state` entries carry no weights and are dropped.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch import Tensor

from braid.errors import BraidError

_MLP = re.compile(r"^(?P<prefix>(?:.*\.)?mlp\.)(?P<rest>(router|experts|shared_experts)\..*)$")
_SEQ = re.compile(r"^experts\.local_experts\.(\d+)\.linear_fc([12])\.weight$")
_TE = re.compile(r"^experts\.linear_fc([12])\.weight(\d+)$")
_SHARED = {
    "shared_experts.linear_fc1.weight": "shared.w13.weight",
    "shared_experts.linear_fc2.weight": "shared.w2.weight",
}
EXPERT_LAYOUTS = ("sequential", "te_grouped")


def megatron_to_braid(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A Megatron GPTModel/MoELayer state dict -> the same model built with Braid's spec."""
    out: dict[str, Tensor] = {}
    layers: dict[str, dict[str, Tensor]] = defaultdict(dict)
    for key, value in sd.items():
        m = _MLP.match(key)
        if m is None:
            out[key] = value
        elif not m["rest"].endswith("_extra_state"):
            layers[m["prefix"]][m["rest"]] = value
    for prefix, parts in layers.items():
        out.update({prefix + "moe." + k: v for k, v in _layer_to_braid(prefix, parts).items()})
    return out


def _layer_to_braid(prefix: str, parts: dict[str, Tensor]) -> dict[str, Tensor]:
    if "router.weight" not in parts:
        raise BraidError(f"state dict: {prefix}router.weight is missing (not a MoE layer?)")
    router = parts.pop("router.weight")
    bias = parts.pop("router.expert_bias", None)
    res = {
        "router.weight": router,
        "router.expert_bias": (router.new_zeros(router.shape[0]) if bias is None else bias).float(),
    }
    fc: dict[str, dict[int, Tensor]] = {"1": {}, "2": {}}
    for key in list(parts):
        if m := _SEQ.match(key):
            fc[m[2]][int(m[1])] = parts.pop(key)
        elif m := _TE.match(key):
            fc[m[1]][int(m[2])] = parts.pop(key)
    n = len(fc["1"])
    if n == 0 or sorted(fc["1"]) != list(range(n)) or sorted(fc["2"]) != list(range(n)):
        raise BraidError(
            f"state dict: {prefix}experts: expected linear_fc1/linear_fc2 weights of local "
            f"experts 0..n-1 (SequentialMLP or TEGroupedMLP layout), got {sorted(parts)[:4]}"
        )
    res["experts.w13"] = torch.stack([fc["1"][i].t() for i in range(n)]).contiguous()
    res["experts.w2"] = torch.stack([fc["2"][i].t() for i in range(n)]).contiguous()
    for theirs, ours in _SHARED.items():
        if theirs in parts:
            res[ours] = parts.pop(theirs)
    if parts:
        raise BraidError(f"state dict: {prefix}{sorted(parts)[0]} has no place in Braid's adapter")
    return res


def braid_to_megatron(
    sd: dict[str, Tensor], *, experts: str = "sequential", expert_bias: bool = False
) -> dict[str, Tensor]:
    """The inverse: a model built with Braid's spec -> Megatron's own MoE layers, with the
    experts in `experts` layout (sequential: the local spec's SequentialMLP; te_grouped:
    TEGroupedMLP). `expert_bias`: keep router.expert_bias (Megatron has it only with
    moe_router_enable_expert_bias)."""
    if experts not in EXPERT_LAYOUTS:
        raise BraidError(f"experts={experts!r}: expected one of {', '.join(EXPERT_LAYOUTS)}")
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        m = re.match(r"^(?P<prefix>(?:.*\.)?mlp\.)moe\.(?P<rest>.*)$", key)
        if m is None:
            out[key] = value
            continue
        p, rest = m["prefix"], m["rest"]
        if rest == "router.weight":
            out[p + rest] = value
        elif rest == "router.expert_bias":
            if expert_bias:
                out[p + rest] = value
        elif rest in ("experts.w13", "experts.w2"):
            j = "1" if rest.endswith("w13") else "2"
            for i in range(value.shape[0]):
                name = (
                    f"experts.local_experts.{i}.linear_fc{j}.weight"
                    if experts == "sequential"
                    else f"experts.linear_fc{j}.weight{i}"
                )
                out[p + name] = value[i].t().contiguous()
        elif rest in _SHARED.values():
            out[p + next(k for k, v in _SHARED.items() if v == rest)] = value
        else:
            raise BraidError(f"state dict: {key} has no place in Megatron's MoELayer")
    return out
