"""RoPE settings between transformers' `rope_parameters` / `rope_scaling` and Braid's knobs.

transformers 5 writes `rope_parameters` ({"rope_theta", "rope_type", ...}); older configs write
`rope_theta` and `rope_scaling` ({"type" or "rope_type", ...}). Braid computes plain RoPE and
YaRN (braid.model.rope). YaRN in transformers (modeling_rope_utils._compute_yarn_parameters):
  * factor None means max_position_embeddings / original_max_position_embeddings;
  * cos/sin are scaled by attention_factor = m(s, mscale) / m(s, mscale_all_dim) when both are
    set (non-zero), else by m(s, 1), with m(s, a) = 0.1 a ln(s) + 1;
  * beta_fast / beta_slow default to 32 / 1, the correction range is truncated (floor/ceil);
  * MLA models (DeepSeek) also scale the softmax by m(s, mscale_all_dim)^2; GQA models do not.
Braid scales cos/sin by m(s, rope_mscale) / m(s, rope_mscale_all_dim) and the softmax by
m(s, rope_mscale_all_dim)^2 whenever rope_mscale_all_dim > 0, so the mapping below keeps both
products equal or refuses.
"""

from __future__ import annotations

from typing import Any

from braid.config import Config
from braid.hf.base import HFConfig, knob, needs, refuse_braid

YARN_KEYS = (
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "attention_factor",
    "truncate",
)


def read_rope(hf: HFConfig, softmax_mscale: bool) -> dict[str, Any]:
    """Braid's rope knobs; `softmax_mscale`: the HF model scales its softmax by YaRN's
    m(s, mscale_all_dim)^2 (MLA) or not (GQA)."""
    params = hf.get("rope_parameters") or {}
    if not isinstance(params, dict):
        hf.refuse("rope_parameters", params, "expected an object")
    params = dict(params)
    scaling = hf.get("rope_scaling")
    if scaling and not isinstance(scaling, dict):
        hf.refuse("rope_scaling", scaling, "expected an object")
    if scaling:
        params.update(scaling)
    theta = hf.number("rope_theta", None)
    if theta is None:
        theta = params.get("rope_theta", 10000.0)
        if isinstance(theta, bool) or not isinstance(theta, (int, float)):
            hf.refuse("rope_parameters.rope_theta", theta, "expected a finite number")
    params.pop("rope_theta", None)
    kinds = {params.pop("rope_type", None), params.pop("type", None)} - {None, "default"}
    kind = kinds.pop() if kinds else "default"
    fraction = params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if fraction not in (None, 1.0):
        hf.refuse("partial_rotary_factor", fraction, "braid rotates the whole head here")
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind == "yarn":
        out.update(_read_yarn(hf, params, softmax_mscale))
    elif kind != "default":
        hf.refuse("rope_scaling.rope_type", kind, "braid computes default and yarn RoPE")
    for key, value in params.items():
        if key not in YARN_KEYS or kind != "yarn":
            hf.refuse(f"rope_parameters.{key}", value, "unknown RoPE setting")
    return out


def _read_yarn(hf: HFConfig, p: dict[str, Any], softmax_mscale: bool) -> dict[str, Any]:
    needs("model", "rope_scaling", "YaRN", hf.model_type)
    orig = p.get("original_max_position_embeddings")
    if not orig:
        hf.refuse("rope_parameters.original_max_position_embeddings", orig, "YaRN needs it")
    factor = p.get("factor") or hf.raw.get("max_position_embeddings", 0) / orig
    if p.get("truncate", True) is not True:
        hf.refuse("rope_parameters.truncate", p.get("truncate"), "braid truncates (floor/ceil)")
    if p.get("attention_factor") is not None:
        hf.refuse(
            "rope_parameters.attention_factor",
            p["attention_factor"],
            "braid derives it from factor, mscale and mscale_all_dim",
        )
    mscale, all_dim = p.get("mscale"), p.get("mscale_all_dim")
    if not (mscale and all_dim):
        # transformers then scales cos/sin by m(s, 1) and (MLA) the softmax by
        # m(s, mscale_all_dim)^2 only if mscale_all_dim is set.
        if all_dim and softmax_mscale:
            hf.refuse(
                "rope_parameters.mscale",
                mscale,
                "with mscale_all_dim set and mscale "
                "unset transformers' two YaRN scales have no braid equivalent",
            )
        mscale, all_dim = 1.0, 0.0
    elif not softmax_mscale:
        hf.refuse(
            "rope_parameters.mscale_all_dim",
            all_dim,
            "this architecture does not "
            "scale its softmax by YaRN's mscale_all_dim, braid's GQA would",
        )
    return {
        "rope_scaling": "yarn",
        "rope_factor": float(factor),
        "rope_original_max_seq_len": int(orig),
        "rope_beta_fast": float(p.get("beta_fast") or 32.0),
        "rope_beta_slow": float(p.get("beta_slow") or 1.0),
        "rope_mscale": float(mscale),
        "rope_mscale_all_dim": float(all_dim),
    }


def write_rope(cfg: Config, arch: str, softmax_mscale: bool) -> dict[str, Any]:
    """`rope_parameters` for config.json, or a refusal when transformers cannot compute it."""
    m = cfg.model
    if knob(cfg, "model", "rope_scaling", "none") == "none":
        return {"rope_theta": m.rope_theta, "rope_type": "default"}
    mscale, all_dim = m.rope_mscale, m.rope_mscale_all_dim
    if all_dim > 0 and not softmax_mscale:
        refuse_braid("model.rope_mscale_all_dim", all_dim, arch, "its softmax has no YaRN scale")
    if (mscale == 0 or all_dim == 0) and mscale != 1.0:
        refuse_braid(
            "model.rope_mscale",
            mscale,
            arch,
            "transformers then scales cos/sin by "
            "m(s, 1); set rope_mscale=1 or a non-zero rope_mscale_all_dim",
        )
    out = {
        "rope_theta": m.rope_theta,
        "rope_type": "yarn",
        "factor": m.rope_factor,
        "original_max_position_embeddings": m.rope_original_max_seq_len,
        "beta_fast": m.rope_beta_fast,
        "beta_slow": m.rope_beta_slow,
    }
    if mscale and all_dim:
        out.update(mscale=mscale, mscale_all_dim=all_dim)
    return out
