"""The run report: `<run_dir>/report.html` plus PNG plots in `<run_dir>/report/`.

Contract: `write_report(run_dir, rank=0)` reads that rank's metrics (see read.py) and writes
  * loss.png            `train/loss` (raw and smoothed) and `val/loss`
  * <key>.png           one per `names.SERIES_PANELS` entry the run logged: lr, tokens_per_s,
                        grad_norm, mfu, aux_loss, z_loss, skipped_steps
  * expert_load.png     one heatmap panel per MoE layer: experts on y, steps on x, colour = share
                        of tokens (white = balanced, red = overloaded, blue = underloaded)
  * expert_imbalance.png  max / mean expert share per layer over steps
and an HTML page with those plots, the summary (`<run_dir>/summary.json`), a table of exposed
communication per layer (metrics `overlap/exposed_ms/layer<i>`, `overlap/exchange_ms/layer<i>`),
a table of every metric, and the config (`<run_dir>/config.json`). A plot or section whose
inputs are absent is skipped. Every file is written to a temp name and renamed into place.
Raises BraidError when the run has no metrics. The plots themselves are drawn by plots.py; metric
names come from names.py and the derived numbers from queries.py, shared with `braid dash`.
"""

from __future__ import annotations

import html
import json
import math
import time
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from braid.errors import BraidError
from braid.metrics import names, queries
from braid.metrics import plots as draw
from braid.metrics.queries import Series
from braid.metrics.read import read_expert_load, read_metrics

PLOT_FILES = (
    "loss.png",
    *(p.file for p in names.SERIES_PANELS),
    "expert_load.png",
    "expert_imbalance.png",
)


def write_report(run_dir: str | PathLike[str], rank: int = 0) -> Path:
    """Write `<run_dir>/report.html` (and its PNGs) from `rank`'s metrics; return its path."""
    run = Path(run_dir)
    metrics = read_metrics(run, rank)
    loads = read_expert_load(run, rank)
    if not metrics and not loads:
        raise BraidError(f"run {run} has no metrics rows yet: train for at least one log interval")
    out = run / "report"
    out.mkdir(parents=True, exist_ok=True)
    config = _read_json(run / "config.json")
    summary = _read_json(run / "summary.json")

    figs: list[tuple[str, str]] = []  # (file, caption)
    if draw.plot_loss(metrics, out / "loss.png"):
        figs.append(("loss.png", "Loss"))
    for p in names.SERIES_PANELS:
        plotted = p.metric in metrics and draw.plot_series(
            metrics[p.metric], out / p.file, p.title, p.metric, p.log_y, p.smooth
        )
        if plotted:
            figs.append((p.file, p.title))
    load_plots = []
    if loads:
        draw.plot_expert_load(loads, out / "expert_load.png")
        draw.plot_imbalance(loads, out / "expert_imbalance.png")
        load_plots = [
            ("expert_load.png", "Expert load: share of each layer's tokens per expert"),
            ("expert_imbalance.png", "Expert imbalance: max / mean share per layer"),
        ]
    made = {f for f, _ in figs + load_plots}
    for stale in set(PLOT_FILES) - made:  # leave no plot from an older report behind
        (out / stale).unlink(missing_ok=True)

    title = str((config.get("run") or {}).get("name") or run.name) if config else run.name
    parts = [
        f"<h1>{_e(title)}</h1>",
        f"<p class=meta>{_e(str(run.resolve()))} &middot; rank {rank} &middot; generated "
        f"{_e(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>",
        _summary_section(summary, metrics),
    ]
    if figs:
        parts.append("<h2>Training</h2>" + "".join(_figure(f, c) for f, c in figs))
    if load_plots:
        parts.append("<h2>Expert load</h2>" + "".join(_figure(f, c) for f, c in load_plots))
    parts.append(_overlap_section(metrics))
    parts.append(_metrics_section(metrics))
    if config:
        parts.append("<h2>Config</h2>" + _kv_table(_flatten(config)))
    page = _PAGE.format(title=_e(title), body="\n".join(p for p in parts if p))
    path = run / "report.html"
    draw.atomic_write(path, lambda f: f.write(page.encode()))
    return path


# -- HTML sections ------------------------------------------------------------------------------


def _summary_section(summary: dict[str, Any], metrics: dict[str, Series]) -> str:
    rows: list[tuple[str, Any]] = list(_flatten(summary).items())
    known = {k for k, _ in rows}
    derived = []
    for name in (names.TRAIN_LOSS, names.VAL_LOSS):
        if metrics.get(name):
            step, value = metrics[name][-1]
            derived.append((f"final {name} (step {step})", value))
    if metrics.get(names.VAL_LOSS):
        step, value = min(metrics[names.VAL_LOSS], key=lambda sv: (not math.isfinite(sv[1]), sv[1]))
        derived.append((f"best val/loss (step {step})", value))
    last = max((s[-1][0] for s in metrics.values() if s), default=None)
    if last is not None:
        derived.append(("last logged step", last))
    rows += [(k, v) for k, v in derived if k not in known]
    return "<h2>Summary</h2>" + _kv_table(dict(rows)) if rows else ""


def _overlap_section(metrics: dict[str, Series]) -> str:
    per_layer = queries.overlap_by_layer(metrics)
    if not per_layer:
        return ""
    rows = []
    tot = {names.OVERLAP_EXCHANGE: 0.0, names.OVERLAP_EXPOSED: 0.0}
    for layer, d in per_layer.items():
        ex, xp = d.get(names.OVERLAP_EXCHANGE), d.get(names.OVERLAP_EXPOSED)
        hidden = f"{100 * (1 - xp / ex):.1f}%" if ex and xp is not None else ""
        rows.append((f"layer {layer}", _fmt(ex), _fmt(xp), hidden))
        for k in tot:
            tot[k] += d.get(k, 0.0)
    if len(per_layer) > 1:
        ex, xp = tot[names.OVERLAP_EXCHANGE], tot[names.OVERLAP_EXPOSED]
        hidden = f"{100 * (1 - xp / ex):.1f}%" if ex else ""
        rows.append(("total", _fmt(ex), _fmt(xp), hidden))
    head = ("layer", "exchange ms", "exposed ms", "hidden")
    note = (
        "<p class=meta>Median over logged steps. Exposed = exchange time not hidden by compute.</p>"
    )
    return "<h2>Communication per layer</h2>" + note + _table(head, rows)


def _metrics_section(metrics: dict[str, Series]) -> str:
    rows = []
    for name in sorted(metrics):
        s = metrics[name]
        if not s:
            continue
        vals = np.array([v for _, v in s], dtype=np.float64)
        fin = vals[np.isfinite(vals)]
        lo, hi = (_fmt(fin.min()), _fmt(fin.max())) if fin.size else ("", "")
        rows.append((name, str(len(s)), f"{s[0][0]}..{s[-1][0]}", _fmt(s[-1][1]), lo, hi))
    head = ("metric", "points", "steps", "last", "min", "max")
    return "<h2>All metrics</h2>" + _table(head, rows) if rows else ""


def _figure(file: str, caption: str) -> str:
    src = _e(f"report/{file}")
    cap = _e(caption)
    return f'<figure><img src="{src}" alt="{cap}"><figcaption>{cap}</figcaption></figure>'


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _kv_table(d: dict[str, Any]) -> str:
    return _table(("key", "value"), [(k, _fmt(v)) for k, v in d.items()])


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)
    return str(v)


def _e(s: str) -> str:
    return html.escape(s, quote=True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        return {"unreadable": f"{path.name}: {e}"}
    return data if isinstance(data, dict) else {"value": data}


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} - braid report</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; }}
h1 {{ margin-bottom: 0.2em; }} h2 {{ margin-top: 1.6em; border-bottom: 1px solid #ddd; }}
.meta {{ color: #666; font-size: 12px; }}
table {{ border-collapse: collapse; font-size: 13px; margin: 0.5em 0; }}
th, td {{ border: 1px solid #ddd; padding: 3px 8px; text-align: left; }}
th {{ background: #f4f4f4; }} td {{ font-variant-numeric: tabular-nums; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; border: 1px solid #eee; }}
figcaption {{ color: #555; font-size: 12px; }}
</style></head>
<body>
{body}
</body></html>
"""
