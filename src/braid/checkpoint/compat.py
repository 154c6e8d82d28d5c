"""May a checkpoint written under one config be resumed under another? The fingerprint rule.

A checkpoint stores its resolved config and fingerprint. Resuming under a config with another
fingerprint is refused, naming the differing keys, with two exceptions:
  * ALWAYS_ALLOWED keys only say where output goes or when this invocation stops;
  * SAFE keys change neither the model nor the math of a training step (schedule length,
    cadence, records, the parallel layout: a checkpoint loads under any (dp, ep) layout), and
    are accepted when `checkpoint.allow_safe_changes=true`.
Everything else (model shape, lr, seed, data, batch, ...) would silently make a different run.
A key the checkpoint does not have at all (a knob added to braid since) counts as unchanged
while it is at its default, which by convention keeps the old behaviour. A saved value is
compared as this braid reads it: one written in a form that is now an alias (overlap.split_dw
= false, now "off") is unchanged when it means the same.
"""

from __future__ import annotations

from pathlib import Path

from braid.config import SECTIONS, Config, diff_configs, from_dict
from braid.errors import BraidError

ALWAYS_ALLOWED = frozenset(
    {
        "checkpoint.resume",
        "checkpoint.allow_safe_changes",
        "train.stop_at",
        "train.progress",
        "run.name",  # a fork under a new name (checkpoint.resume=<other run>) is the same training
        # How often state is saved or metrics written never changes a step's numbers.
        "checkpoint.every",
        "metrics.flush_every",
        "metrics.flush_seconds",
        "parallel.timeout_min",  # how long a collective may wait: no step's numbers
        "data.verify",  # how much of the same data is checked at start
    }
)
SAFE = frozenset(
    {
        "train.steps",
        "train.warmup",
        "train.min_lr_ratio",
        "train.log_every",
        "train.val_every",
        "run.dir",
        "parallel.ep",
        "parallel.dense",
        "parallel.activation_checkpoint",
        # Weights and optimizer state are stored in full precision whatever the GEMM precision,
        # so a run may switch between bf16 and fp8 GEMMs (a change of numerics, not of the model).
        "train.precision",
        "train.fp8_skip",
        "train.fp8_wgrad",
        # Which SDPA kernel computes the same attention (rounding differs, the model does not).
        "model.sdpa_backend",
        # The residual stream's dtype under autocast: rounding, not the model.
        "model.residual",
    }
)
SAFE_SECTIONS = ("metrics.", "checkpoint.")
_SHOWN = 6  # keys named in an error line before "and N more"


def is_safe(key: str) -> bool:
    return key in SAFE or key in ALWAYS_ALLOWED or key.startswith(SAFE_SECTIONS)


def check_resume_config(saved: dict, cfg: Config, where: Path) -> list[str]:
    """The differing keys that are accepted; raises BraidError if resuming must be refused."""
    now, saved = cfg.to_dict(), as_read_now(saved)
    diffs = [
        k
        for k in diff_configs(saved, now)
        if k not in ALWAYS_ALLOWED and not _new_knob_at_default(k, saved, now)
    ]
    if not diffs:
        return []
    unsafe = [k for k in diffs if not is_safe(k)]
    if not unsafe and cfg.checkpoint.allow_safe_changes:
        return diffs
    shown = _describe(unsafe or diffs, saved, now)
    if unsafe:
        raise BraidError(
            f"checkpoint {where} was written with another config: {shown}; these change the "
            "model or the training math, so resume with the checkpoint's config (its meta.json) "
            "or start fresh under another run.name"
        )
    raise BraidError(
        f"checkpoint {where} was written with another config: {shown}; these are safe to "
        "change: set checkpoint.allow_safe_changes=true to resume anyway"
    )


def as_read_now(saved: dict) -> dict:
    """`saved` with every value of a known key as this braid reads it (aliases resolved)."""
    out = {}
    for sec, body in saved.items():
        known = sec in SECTIONS and isinstance(body, dict)
        out[sec] = {k: _read_now(sec, k, v) for k, v in body.items()} if known else body
    return out


def _read_now(sec: str, key: str, value: object) -> object:
    try:
        return getattr(getattr(from_dict({sec: {key: value}}), sec), key)
    except BraidError:  # a key or value this braid no longer has: compared as written
        return value


def _new_knob_at_default(key: str, saved: dict, now: dict) -> bool:
    """A key the checkpoint's braid did not have yet, left at its default: the old behaviour."""
    sec, _, name = key.partition(".")
    if name in saved.get(sec, {}):
        return False
    return now.get(sec, {}).get(name) == Config().to_dict().get(sec, {}).get(name, _MISSING)


_MISSING = object()


def _describe(keys: list[str], saved: dict, now: dict) -> str:
    def value(d: dict, key: str) -> str:
        sec, _, name = key.partition(".")
        return repr(d.get(sec, {}).get(name, "<absent>"))

    parts = [f"{k} {value(saved, k)} -> {value(now, k)}" for k in keys[:_SHOWN]]
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(parts) + more
