"""Report plots: each function renders one PNG from metric series with matplotlib's Agg canvas.

Contract: `plot_loss`, `plot_series`, `plot_expert_load` and `plot_imbalance` take data as
returned by `read_metrics` / `read_expert_load` (smoothing, binning and the imbalance ratio come
from queries.py, which the dashboard shares) and a target path, and write the PNG atomically
(temp file + rename). They use `matplotlib.figure.Figure` with `FigureCanvasAgg` directly, so
they never touch pyplot or the process-wide backend. Heatmaps are binned to at most
`MAX_HEATMAP_COLUMNS` step columns so long runs stay readable.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from braid.metrics import names, queries
from braid.metrics.queries import Series

MAX_HEATMAP_COLUMNS = 600


def _new_figure(width: float = 9.0, height: float = 3.6) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call `write(file)` on a hidden temp file beside `path`, then rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _save(fig: Figure, path: Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


def _xy(series: Series) -> tuple[np.ndarray, np.ndarray]:
    x = np.array([s for s, _ in series], dtype=np.float64)
    y = np.array([v for _, v in series], dtype=np.float64)
    return x, y


def _style(ax: Any, title: str, ylabel: str, y: np.ndarray, log_y: bool) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    finite = y[np.isfinite(y)]
    if log_y and finite.size and finite.min() > 0 and finite.max() / finite.min() > 10:
        ax.set_yscale("log")


def plot_series(
    series: Series, path: Path, title: str, label: str, log_y: bool, smooth: bool = True
) -> bool:
    """One metric over steps (with a smoothed line when noisy); False if it has no values."""
    x, y = _xy(series)
    if not np.isfinite(y).any():
        return False
    fig = _new_figure()
    ax = fig.add_subplot()
    if smooth and len(y) >= 20:
        ax.plot(x, y, color="C0", alpha=0.3, linewidth=0.8, label=label)
        ax.plot(x, queries.smooth(y), color="C0", linewidth=1.6, label=f"{label} (smoothed)")
        ax.legend(loc="best", fontsize=8)
    else:
        ax.plot(x, y, color="C0", marker="o" if len(y) < 20 else None, markersize=3, linewidth=1.4)
    _style(ax, title, label, y, log_y)
    _save(fig, path)
    return True


def plot_loss(metrics: dict[str, Series], path: Path) -> bool:
    """`train/loss` (raw and smoothed) with `val/loss` on one axis; False if neither exists."""
    train, val = metrics.get(names.TRAIN_LOSS), metrics.get(names.VAL_LOSS)
    if not train and not val:
        return False
    fig = _new_figure(9.0, 4.2)
    ax = fig.add_subplot()
    ys = []
    if train:
        x, y = _xy(train)
        ys.append(y)
        if len(y) >= 20:
            ax.plot(x, y, color="C0", alpha=0.3, linewidth=0.8, label=names.TRAIN_LOSS)
            ax.plot(
                x,
                queries.smooth(y),
                color="C0",
                linewidth=1.6,
                label=f"{names.TRAIN_LOSS} (smoothed)",
            )
        else:
            ax.plot(x, y, color="C0", marker="o", markersize=3, label=names.TRAIN_LOSS)
    if val:
        x, y = _xy(val)
        ys.append(y)
        ax.plot(x, y, color="C3", marker="o", markersize=4, linewidth=1.6, label=names.VAL_LOSS)
    ax.legend(loc="best", fontsize=8)
    _style(ax, "Loss", "loss", np.concatenate(ys), log_y=True)
    _save(fig, path)
    return True


def _edges(x: np.ndarray) -> np.ndarray:
    if len(x) == 1:
        return np.array([x[0] - 0.5, x[0] + 0.5])
    mid = (x[:-1] + x[1:]) / 2
    return np.concatenate([[x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]])


def plot_expert_load(loads: dict[int, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    """One heatmap panel per layer (experts x steps), diverging around the balanced share."""
    layers = sorted(loads)
    binned = {la: queries.bin_columns(*loads[la], MAX_HEATMAP_COLUMNS) for la in layers}
    values = np.concatenate([g.ravel() for _, g in binned.values()])
    finite = values[np.isfinite(values)]
    center = float(
        np.mean([np.nanmean(np.nansum(g, axis=1)) / g.shape[1] for _, g in binned.values()])
    )
    # clip the colour scale at the 99.5th percentile so a few spikes do not wash out the rest
    top = float(np.percentile(finite, 99.5)) if finite.size else 1.0
    if math.isfinite(center) and center > 0:
        norm: Normalize = TwoSlopeNorm(vcenter=center, vmin=0.0, vmax=max(top, 2 * center))
    else:
        norm = Normalize(vmin=0.0, vmax=top or 1.0)
    ncols = 1 if len(layers) <= 4 else 2
    nrows = math.ceil(len(layers) / ncols)
    n_exp = max(g.shape[1] for _, g in binned.values())
    panel_h = min(3.5, max(2.2, 0.09 * n_exp))
    fig = _new_figure(9.0 if ncols == 1 else 13.0, 0.8 + panel_h * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    mesh = None
    for i, la in enumerate(layers):
        ax = axes[i // ncols][i % ncols]
        x, g = binned[la]
        mesh = ax.pcolormesh(
            _edges(x), np.arange(g.shape[1] + 1) - 0.5, g.T, cmap="RdBu_r", norm=norm
        )
        ax.set_title(f"layer {la}", fontsize=9)
        ax.set_ylabel("expert")
        if g.shape[1] <= 16:
            ax.set_yticks(range(g.shape[1]))
        ax.tick_params(labelsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for j in range(len(layers), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    if mesh is not None:
        extend = "max" if finite.size and finite.max() > norm.vmax else "neither"
        bar = fig.colorbar(mesh, ax=axes, shrink=0.9, extend=extend)
        bar.set_label("fraction of tokens")
    fig.suptitle(f"Expert load per MoE layer (white = balanced share, {center:.3g})")
    _save(fig, path)


def plot_imbalance(loads: dict[int, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    """Max / mean expert share per layer over steps (1 = perfectly balanced)."""
    fig = _new_figure()
    ax = fig.add_subplot()
    for la in sorted(loads):
        steps, g = loads[la]
        ax.plot(steps, queries.imbalance(g), linewidth=1.2, label=f"layer {la}")
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    if len(loads) <= 12:
        ax.legend(loc="best", fontsize=8, ncols=2 if len(loads) > 6 else 1)
    _style(ax, "Expert imbalance (1 = perfectly balanced)", "max / mean share", np.ones(1), False)
    _save(fig, path)
