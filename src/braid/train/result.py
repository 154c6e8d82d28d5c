"""The result of `braid train`: the JSON object its last stdout line prints and the run's
summary.json holds, in strict JSON."""

from __future__ import annotations

import json
import math
import sys


def json_safe(obj):
    """`obj` with every NaN or infinity replaced by None (null): strict JSON has no NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def print_result(result: dict) -> None:
    """The contract of `braid train`: its last stdout line is this JSON object (strict JSON:
    a value that is not a finite number, such as the loss of a run that skipped every step, is
    null)."""
    sys.stdout.flush()
    print(json.dumps(json_safe(result), allow_nan=False), flush=True)
