"""Predicted-vs-measured plot of a surrogate on its held-out masks (matplotlib, Agg canvas, PNG).

Example:
    >>> plot_fit(measured, predicted, removed, "fit.png", predicted_std=std)  # doctest: +SKIP
    >>> plot_validation("runs/default/surrogate", "runs/default/fit.png")   # from validation.npz  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from layershap.core.errors import LayershapError

from .metrics import regression_metrics

VALIDATION_FILE = "validation.npz"


def plot_fit(
    measured: np.ndarray,
    predicted: np.ndarray,
    removed: np.ndarray,
    path: str | Path,
    predicted_std: np.ndarray | None = None,
    title: str = "surrogate on held-out masks",
    utility: str = "nll",
) -> Path:
    """Scatter predicted vs measured loss (nats; ``utility`` names it: nll or kl), coloured by removed-layer count, with the y = x line,
    ensemble-spread error bars and R² / Spearman / Kendall τ in the corner. Returns the PNG path.

    Example:
        >>> plot_fit(np.array([2.0, 3.0]), np.array([2.1, 2.9]), np.array([1, 2]), "fit.png")
        PosixPath('fit.png')
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    y = np.asarray(measured, dtype=np.float64)
    p = np.asarray(predicted, dtype=np.float64)
    removed = np.asarray(removed)
    fig = Figure(figsize=(5.5, 5.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if predicted_std is not None and np.any(np.asarray(predicted_std) > 0):
        ax.errorbar(y, p, yerr=predicted_std, fmt="none", ecolor="0.6", elinewidth=0.8, zorder=1)
    points = ax.scatter(y, p, c=removed, cmap="viridis", s=14, zorder=2)
    strata = np.unique(removed)
    if len(strata) > 1:
        step = max(1, int(np.ceil(len(strata) / 12)))
        fig.colorbar(points, ax=ax, label="layers removed", ticks=strata[::step])
    both = np.concatenate([y, p]) if len(y) else np.array([0.0, 1.0])
    lo, hi = float(both.min()), float(both.max())
    pad = 0.03 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.3", lw=1, ls="--", zorder=0)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel(f"measured {utility} (nats)")
    ax.set_ylabel(f"predicted {utility} (nats)")
    ax.set_title(title)
    m = regression_metrics(y, p)

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    ax.text(0.03, 0.97, f"n = {m['n']}\nR² = {fmt(m['r2'])}\nSpearman = {fmt(m['spearman'])}\n"
            f"Kendall τ = {fmt(m['kendall'])}", transform=ax.transAxes, va="top", fontsize=9,
            bbox={"boxstyle": "round", "fc": "white", "ec": "0.8"})
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def plot_validation(surrogate_dir: str | Path, path: str | Path) -> Path:
    """:func:`plot_fit` from a surrogate directory's ``validation.npz``.

    Example:
        >>> plot_validation("runs/default/surrogate", "scores_fit.png")     # doctest: +SKIP
    """
    file = Path(surrogate_dir) / VALIDATION_FILE
    if not file.is_file():
        raise LayershapError(f"{file} is missing; it is written by `layershap train`")
    meta = Path(surrogate_dir) / "metadata.json"
    utility = json.loads(meta.read_text()).get("utility", "nll") if meta.is_file() else "nll"
    with np.load(file) as v:
        removed = (~v["masks"]).sum(axis=1)
        return plot_fit(v["measured"], v["predicted"], removed, path, predicted_std=v["predicted_std"],
                        utility=utility)
