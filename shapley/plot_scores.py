"""PNG plots of layer scores: bar chart with error bars, and a heatmap of pairwise interactions.

matplotlib figures on an Agg canvas (no display needed, pyplot untouched).

Example:
    >>> plot_scores(scores, "scores.png", title="gemma-3-270m: semivalue[1:6]")  # doctest: +SKIP
    >>> plot_interactions(scores.extra["interactions"], "scores_interactions.png")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .game import Scores


def _figure(width: float, height: float):
    """A matplotlib Figure on an Agg canvas (no pyplot, so the caller's backend is left alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_scores(scores: Scores, path: str | Path, title: str | None = None, n_se: float = 2.0) -> Path:
    """Bar chart of per-layer scores with ±``n_se`` standard-error bars; the lowest-ranked layers are outlined.

    Example:
        >>> plot_scores(scores, "runs/x/scores.png")  # doctest: +SKIP
    """
    n = scores.n_layers
    x = np.arange(n)
    colors = np.where(scores.values >= 0, "#3b75af", "#c44e52")
    fig = _figure(max(6.0, 0.45 * n + 2.0), 4.0)
    ax = fig.add_subplot()
    has_se = bool(np.any(scores.stderr > 0))
    ax.bar(x, scores.values, color=colors, yerr=n_se * scores.stderr if has_se else None, capsize=3 if has_se else 0,
           error_kw={"elinewidth": 1.0, "ecolor": "black"})
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels([str(i) for i in x], fontsize=8 if n > 24 else 10)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{scores.index} of −nll (nats)")
    se_note = f"bars ±{n_se:g} s.e." if has_se else "exact (no sampling error)"
    ax.set_title(title or f"layer scores: {scores.index}, {scores.method} ({se_note})", fontsize=10)
    rank = scores.prune_rank()
    tips = scores.values + np.sign(scores.values) * (n_se * scores.stderr if has_se else 0.0)
    for i in range(n):
        up = scores.values[i] >= 0
        ax.annotate(str(rank[i]), (i, tips[i]), xytext=(0, 3 if up else -3), textcoords="offset points",
                    ha="center", va="bottom" if up else "top", fontsize=7, color="dimgray")
    ax.margins(y=0.12)
    ax.text(0.99, 0.98, f"grey numbers: prune rank (1 = least important); {se_note}", transform=ax.transAxes,
            ha="right", va="top", fontsize=7, color="dimgray")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_interactions(matrix: np.ndarray, path: str | Path, title: str | None = None) -> Path:
    """Heatmap of the pairwise interaction matrix (symmetric colour scale around 0)."""
    m = np.asarray(matrix, dtype=np.float64)
    lim = float(np.abs(m).max()) or 1.0
    fig = _figure(5.5, 4.6)
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
    fig.colorbar(im, ax=ax, label="Shapley interaction (nats)")
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(title or "pairwise Shapley interactions (>0: synergy, <0: redundancy)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
