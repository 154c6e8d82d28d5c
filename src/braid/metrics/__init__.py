"""braid.metrics: run registry (SQLite), per-rank metrics (DuckDB) and the HTML run report.

Contract: the public names below; `experiments`, `store` and `report` are imported on first use
(PEP 562), so `import braid.config` (which imports braid.metrics.config) never loads duckdb or
matplotlib. `format_runs` prints the `braid runs` table.

    ExperimentsDB(root).start / heartbeat / finish / list_runs / get_run    experiments.py
    git_revision(path)                                                       experiments.py
    MetricsWriter(run_dir, rank).log / log_expert_load / end_step / flush / close   store.py
    read_metrics(run_dir, rank), read_expert_load(run_dir, rank)             read.py
    write_report(run_dir, rank=0) -> Path                                    report.py
"""

from __future__ import annotations

import importlib
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the real imports are lazy, see __getattr__
    from braid.metrics.experiments import ExperimentsDB, git_revision
    from braid.metrics.read import read_expert_load, read_metrics
    from braid.metrics.report import write_report
    from braid.metrics.store import MetricsWriter, metrics_path

__all__ = [
    "ExperimentsDB",
    "MetricsWriter",
    "format_duration",
    "format_runs",
    "git_revision",
    "metrics_path",
    "read_expert_load",
    "read_metrics",
    "write_report",
]

_LAZY = {
    "ExperimentsDB": "braid.metrics.experiments",
    "git_revision": "braid.metrics.experiments",
    "MetricsWriter": "braid.metrics.store",
    "metrics_path": "braid.metrics.store",
    "read_metrics": "braid.metrics.read",
    "read_expert_load": "braid.metrics.read",
    "write_report": "braid.metrics.report",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'braid.metrics' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def format_runs(runs: list[dict[str, Any]], *, now: float | None = None) -> str:
    """A plain aligned text table: id, name, status, step, last loss, started, duration."""
    if not runs:
        return "no runs"
    now = time.time() if now is None else now
    header = ("id", "name", "status", "step", "last loss", "started", "duration")
    rows = [header]
    for r in runs:
        start = r.get("start_time")
        end = r.get("end_time") or (
            now if r.get("status") == "running" else r.get("heartbeat_time")
        )
        loss = r.get("last_loss")
        rows.append(
            (
                str(r.get("id", "")),
                str(r.get("name") or ""),
                str(r.get("status", "")),
                "" if r.get("step") is None else str(r["step"]),
                "" if loss is None else f"{loss:.4f}",
                "" if not start else time.strftime("%Y-%m-%d %H:%M", time.localtime(start)),
                "" if not start or not end else format_duration(end - start),
            )
        )
    right = {3, 4, 6}
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for row in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_duration(seconds: float) -> str:
    """42s, 3m05s, 2h07m, 3d04h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
