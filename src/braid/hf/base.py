"""What an architecture adapter is: config translation both ways and a key map of tensor specs.

An adapter (one file per Hugging Face `model_type`, registered in `braid.hf.registry`) states:
  * `braid_sections(hf)`: the `[model]`/`[moe]` knobs of the HF config.json, read through an
    `HFConfig` that refuses (one line, exit 2) every setting Braid cannot compute exactly,
    including keys it has never heard of (an allowlist, not a blocklist);
  * `hf_config(cfg)`: the config.json of the HF architecture for a Braid config, or a refusal
    naming the Braid setting no HF architecture of this type computes;
  * `specs(cfg)`: one `Spec` per Braid tensor: the HF tensors it is made of and the exact,
    invertible transform between them (RoPE row permutation, k|v and gate|up fusion, expert
    stacking, transposes). Import and export both walk this one list, so they cannot disagree.
Braid keeps its own layout inside (interleaved RoPE pairs, fused k|v and gate|up, experts
stacked as [E, D, 2F] / [E, F, D]); conversion happens only here, at the boundary.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from braid.config import Config
from braid.errors import BraidError

# Keys of a transformers config.json that never change what the model computes at inference or
# what a weight means: bookkeeping, generation defaults, training-only switches.
HARMLESS = frozenset(
    {
        "architectures",
        "model_type",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "use_cache",
        "initializer_range",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "output_router_logits",
        "attention_dropout",
        "_name_or_path",
        "auto_map",
        "return_dict",
        "output_attentions",
        "output_hidden_states",
        "tie_encoder_decoder",
        "is_encoder_decoder",
        "id2label",
        "label2id",
        "chunk_size_feed_forward",
        "problem_type",
        "tokenizer_class",
        "prefix",
        "task_specific_params",
        "pretraining_tp",
        "router_aux_loss_coef",
        "max_window_layers",
        "generation_config",
        "use_bfloat16",
    }
)


class HFRefusal(BraidError):
    """An HF setting, tensor or file Braid cannot convert exactly."""


_REQUIRED = object()  # HFConfig's typed getters: no default, the key must be there


class HFConfig:
    """A config.json as a read-once allowlist: every key must be read (or be HARMLESS)."""

    def __init__(self, raw: dict[str, Any], where: str):
        self.raw, self.where, self.used = raw, where, set()
        self.keys: set[str] = set()  # the checkpoint's tensor names (set by the importer)
        self.model_type = str(raw.get("model_type"))

    def get(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        return self.raw.get(key, default)

    def require(self, key: str) -> Any:
        self.used.add(key)
        if key not in self.raw:
            raise HFRefusal(
                f"{self.where} has no {key!r}, which model_type {self.model_type} needs"
            )
        return self.raw[key]

    def integer(self, key: str, default: Any = _REQUIRED) -> Any:
        """An integer setting (JSON int, or a float with an integral value); missing or null
        is `default` (no default: required). Strings, bools and fractions are refused."""
        value = self._typed(key, default)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            self.refuse(key, value, "expected an integer")
        return value

    def number(self, key: str, default: Any = _REQUIRED) -> Any:
        """A finite real setting (JSON int or float) as a float; missing or null is `default`."""
        value = self._typed(key, default)
        if value is None:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            self.refuse(key, value, "expected a finite number")
        return float(value)

    def flag(self, key: str, default: Any = _REQUIRED) -> Any:
        """A true/false setting (JSON true or false; not "false" or 0); missing is `default`,
        null is false (as transformers' `if config.key:` reads it)."""
        if default is not _REQUIRED and self.get(key, default) is None:
            return False
        value = self._typed(key, default)
        if not isinstance(value, bool):
            self.refuse(key, value, "expected true or false")
        return value

    def _typed(self, key: str, default: Any) -> Any:
        """The value of `key`: required (no default) and not null, or `default` when missing
        or null."""
        if default is _REQUIRED:
            value = self.require(key)
            if value is None:
                self.refuse(key, value, "a value is needed")
            return value
        value = self.get(key, default)
        return default if value is None else value

    def expect(self, key: str, allowed: Sequence[Any], default: Any = None) -> Any:
        """The value of `key`, refused unless it is one of `allowed` (missing means default)."""
        value = self.get(key, default)
        if value not in allowed:
            self.refuse(key, value, "braid computes only " + " or ".join(map(repr, allowed)))
        return value

    def refuse(self, key: str, value: Any, why: str) -> None:
        raise HFRefusal(
            f"{self.where}: {key}={value!r} is not supported for model_type "
            f"{self.model_type} ({why})"
        )

    def finish(self) -> None:
        """Refuse any key nobody read: an unknown setting might change the computation."""
        for key in sorted(self.raw):
            if key not in self.used and key not in HARMLESS:
                self.refuse(
                    key,
                    self.raw[key],
                    "unknown setting; braid cannot tell whether it changes the computation",
                )


def needs(section: str, key: str, feature: str, model_type: str) -> None:
    """Refuse when this braid lacks the knob `section.key` an architecture needs."""
    from braid.config import SECTIONS

    names = {f.name for f in dataclasses.fields(SECTIONS[section])}
    if key not in names:
        raise HFRefusal(
            f"model_type {model_type} needs {section}.{key} ({feature}), which "
            "this braid does not have yet"
        )


def knob(cfg: Config, section: str, key: str, default: Any) -> Any:
    """A knob of `cfg` that older braids lack, as its default when absent."""
    return getattr(getattr(cfg, section), key, default)


@dataclass(frozen=True)
class Spec:
    """One Braid tensor and the HF tensors it is made of.

    `to_braid(hf_tensors) -> braid_tensor` and `to_hf(braid_tensor) -> hf_tensors` are exact
    inverses (permutations, concatenations, transposes, stacking: no arithmetic)."""

    braid: str
    hf: tuple[str, ...]
    to_braid: Callable[[list[Tensor]], Tensor]
    to_hf: Callable[[Tensor], list[Tensor]]


def same(braid: str, hf: str) -> Spec:
    return Spec(braid, (hf,), lambda ts: ts[0], lambda t: [t])


def rope_perm(head_dim: int, rot_dim: int, start: int = 0) -> Tensor:
    """Braid row j of a head comes from HF row perm[j]: half-split -> interleaved pairs.

    HF (Llama's rotate_half) rotates dim i with dim i + r/2 of the r rotated dims (the head's
    dims [start, start + r)); Braid rotates dims 2i and 2i+1 of them. The same permutation of
    q's and k's rows leaves every q.k product unchanged, and RMSNorm over a head commutes
    with it."""
    half = rot_dim // 2
    pairs = torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).flatten()
    return torch.cat([torch.arange(start), start + pairs, torch.arange(start + rot_dim, head_dim)])


def permute_heads(t: Tensor, heads: int, perm: Tensor) -> Tensor:
    """Apply a per-head row permutation to a [heads*Dh, ...] weight (or [heads*Dh] bias)."""
    rest = t.shape[1:]
    return t.reshape(heads, perm.numel(), *rest)[:, perm].reshape(heads * perm.numel(), *rest)


def rope_rows(braid: str, hf: str, heads: int, head_dim: int, rot_dim: int, start: int = 0) -> Spec:
    perm = rope_perm(head_dim, rot_dim, start)
    inv = torch.argsort(perm)
    return Spec(
        braid,
        (hf,),
        lambda ts: permute_heads(ts[0], heads, perm),
        lambda t: [permute_heads(t, heads, inv)],
    )


def fused_kv(braid: str, k: str, v: str, heads: int, head_dim: int, rot_dim: int | None) -> Spec:
    """Braid's wkv rows are [k; v]; k's rows are RoPE-permuted unless rot_dim is None (bias-free
    tensors such as v are never permuted)."""
    n = heads * head_dim
    perm = rope_perm(head_dim, rot_dim) if rot_dim is not None else torch.arange(head_dim)
    inv = torch.argsort(perm)
    return Spec(
        braid,
        (k, v),
        lambda ts: torch.cat([permute_heads(ts[0], heads, perm), ts[1]]),
        lambda t: [permute_heads(t[:n], heads, inv), t[n:]],
    )


def fused_mlp(braid: str, gate: str, up: str, down: str | None = None) -> list[Spec]:
    """A dense SwiGLU: Braid's w13 Linear holds [gate; up] rows, w2 is HF's down_proj."""
    specs = [
        Spec(
            f"{braid}.w13.weight", (gate, up), lambda ts: torch.cat(ts), lambda t: list(t.chunk(2))
        )
    ]
    if down is not None:
        specs.append(same(f"{braid}.w2.weight", down))
    return specs


def stacked_experts(braid: str, n: int, gate: str, up: str, down: str) -> list[Spec]:
    """Routed experts: HF's per-expert Linear weights (`{e}` in the names) <-> Braid's stacks
    w13 [E, D, 2F] = [gate_e^T | up_e^T] and w2 [E, F, D] = down_e^T."""
    g = tuple(gate.format(e=e) for e in range(n))
    u = tuple(up.format(e=e) for e in range(n))
    d = tuple(down.format(e=e) for e in range(n))

    def w13_in(ts: list[Tensor]) -> Tensor:
        # One preallocated stack filled by transposed copies: no per-expert temporaries.
        F, D = ts[0].shape
        out = ts[0].new_empty(n, D, 2 * F)
        for e in range(n):
            out[e, :, :F].copy_(ts[e].t())
            out[e, :, F:].copy_(ts[n + e].t())
        return out

    def w2_in(ts: list[Tensor]) -> Tensor:
        D, F = ts[0].shape
        out = ts[0].new_empty(n, F, D)
        for e in range(n):
            out[e].copy_(ts[e].t())
        return out

    def w13_out(t: Tensor) -> list[Tensor]:
        gates, ups = zip(*(w.t().contiguous().chunk(2) for w in t), strict=True)
        return [x.contiguous() for x in (*gates, *ups)]

    return [
        Spec(f"{braid}.w13", g + u, w13_in, w13_out),
        Spec(
            f"{braid}.w2",
            d,
            w2_in,
            lambda t: [w.t().contiguous() for w in t],
        ),
    ]


class Adapter:
    """One Hugging Face architecture. Subclasses set the names and implement the three parts."""

    model_type: str = ""
    architecture: str = ""  # the transformers class name written into config.json

    def braid_sections(self, hf: HFConfig) -> dict[str, dict[str, Any]]:
        """{"model": {...}, "moe": {...}} knobs for the HF config (refusing what is unsupported)."""
        raise NotImplementedError

    def hf_config(self, cfg: Config) -> dict[str, Any]:
        """config.json for `cfg`, or HFRefusal naming the Braid setting this type cannot hold."""
        raise NotImplementedError

    def specs(self, cfg: Config) -> list[Spec]:
        raise NotImplementedError

    def ignored(self, key: str, cfg: Config) -> bool:
        """HF tensors that carry no weights Braid needs (e.g. a stored rotary inv_freq)."""
        return key.endswith("rotary_emb.inv_freq")


def refuse_braid(cfg_key: str, value: Any, arch: str, why: str) -> None:
    raise HFRefusal(f"config {cfg_key}={value!r} has no equivalent in {arch} ({why})")
