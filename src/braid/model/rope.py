"""Rotary position embeddings: the cos/sin table (plain or YaRN-scaled) and its application.

Layout: interleaved pairs, dims (2i, 2i+1) of a head rotate together by angle pos * inv_freq[i]
(RoFormer, Su et al. 2021). Partial rotary rotates only the leading `rot` dims of each head and
passes the rest through (GPT-NeoX / Phi's `partial_rotary_factor`).

YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language Models"),
with DeepSeek-V2/V3's parametrisation: frequencies whose wavelength fits many times into the
original context (more than beta_fast rotations) are kept, those with fewer than beta_slow
rotations are divided by the factor s, and a linear ramp blends the ones between. The
attention temperature is split in two as DeepSeek does: cos/sin are multiplied by
m(s, mscale) / m(s, mscale_all_dim), and the softmax scale by m(s, mscale_all_dim)^2, where
m(s, a) = 0.1 * a * ln(s) + 1 (1 when s <= 1).

Shape legend: T positions, R = rot / 2 rotated pairs, B batch, H heads, Dh head dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from braid.model.config import ModelConfig


def yarn_mscale(factor: float, mscale: float) -> float:
    """m(s, a) = 0.1 * a * ln(s) + 1, or 1 when s <= 1 (YaRN's attention temperature)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def _correction_dim(rotations: float, rot: int, theta: float, original_len: int) -> float:
    # The pair index i whose wavelength 2*pi*theta^(2i/rot) turns `rotations` times in the
    # original context (YaRN eq. 17 solved for the dimension).
    return rot * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def inv_freq(cfg: ModelConfig) -> Tensor:
    """Inverse frequencies [R] of the rotated dims, YaRN-blended when rope_scaling = yarn."""
    rot = cfg.rope_dim
    base = 1.0 / (cfg.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    if cfg.rope_scaling != "yarn":
        return base
    s, orig = cfg.rope_factor, cfg.rope_original_max_seq_len
    low = max(math.floor(_correction_dim(cfg.rope_beta_fast, rot, cfg.rope_theta, orig)), 0)
    high = min(math.ceil(_correction_dim(cfg.rope_beta_slow, rot, cfg.rope_theta, orig)), rot - 1)
    # ramp: 0 for pairs below `low` (high frequency, kept), 1 above `high` (interpolated).
    span = high - low if high != low else 1e-3  # as DeepSeek's linear ramp
    ramp = ((torch.arange(rot // 2, dtype=torch.float32) - low) / span).clamp(0, 1)
    return base / s * ramp + base * (1 - ramp)


def rope_cos_scale(cfg: ModelConfig) -> float:
    """Factor on cos/sin (YaRN's temperature share that goes into q and k)."""
    if cfg.rope_scaling != "yarn":
        return 1.0
    s = cfg.rope_factor
    return yarn_mscale(s, cfg.rope_mscale) / yarn_mscale(s, cfg.rope_mscale_all_dim)


def softmax_scale(cfg: ModelConfig, qk_dim: int) -> float | None:
    """1/sqrt(qk_dim) times m(s, mscale_all_dim)^2 under YaRN with mscale_all_dim > 0; None
    (the kernel's own 1/sqrt(qk_dim)) otherwise."""
    if cfg.rope_scaling == "yarn" and cfg.rope_mscale_all_dim > 0:
        return qk_dim**-0.5 * yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim) ** 2
    return None


def rope_table(cfg: ModelConfig, max_len: int | None = None) -> Tensor:
    """cos/sin table [T, R, 2] (fp32) for positions 0..max_len-1 (default model.max_seq_len)."""
    t = torch.arange(max_len or cfg.max_seq_len, dtype=torch.float32)
    ang = torch.outer(t, inv_freq(cfg))
    return torch.stack([ang.cos(), ang.sin()], dim=-1) * rope_cos_scale(cfg)


def plain_rope_table(rot: int, max_len: int, theta: float) -> Tensor:
    """The unscaled table [T, rot/2, 2] for `rot` rotated dims."""
    inv = 1.0 / (theta ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    ang = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
    return torch.stack([ang.cos(), ang.sin()], dim=-1)


def apply_rope(x_BTHDh: Tensor, table_TR2: Tensor) -> Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of the leading 2R dims by the position angle; the other
    dims pass through. Table rows match x's positions (dim 1)."""
    rot = 2 * table_TR2.shape[-2]
    head, tail = x_BTHDh[..., :rot], x_BTHDh[..., rot:]
    x = head.float().unflatten(-1, (-1, 2))
    cos, sin = table_TR2[None, :, None, :, 0], table_TR2[None, :, None, :, 1]
    out = torch.stack([x[..., 0] * cos - x[..., 1] * sin, x[..., 0] * sin + x[..., 1] * cos], -1)
    out = out.flatten(-2).type_as(x_BTHDh)
    return out if tail.shape[-1] == 0 else torch.cat([out, tail], dim=-1)
