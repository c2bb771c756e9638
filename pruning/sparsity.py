"""Per-layer sparsity ratios from layer scores (OWL-style bounded linear mapping) for Wanda/SparseGPT-style pruners.

Scores are mapped linearly onto ``[target - lam, target + lam]`` (highest score -> lowest sparsity), then one
common shift ``c`` is applied and the result clipped to ``[max(0, target - lam), min(1, target + lam)]``,
with ``c`` chosen so the mean is exactly the target. The mean of the clipped values is continuous and
non-decreasing in ``c``, so ``c`` exists and is found by bisection plus an exact solve on the unclipped layers.
All equal scores give every layer the target.

Example:
    >>> owl_sparsities(np.array([0.1, 0.5, 0.3]), target=0.7, lam=0.08)
    array([0.78, 0.62, 0.7 ])
    >>> export_document(read_scores("scores.json"), 0.7, 0.08, "scores.json")["sparsities"]
"""

from __future__ import annotations

import numpy as np

from layershap.core.errors import LayershapError
from layershap.shapley.scores_io import ScoresRecord


def _mean_at(base: np.ndarray, c: float, lo: float, hi: float) -> float:
    return float(np.clip(base + c, lo, hi).mean())


def owl_sparsities(scores: np.ndarray, target: float, lam: float) -> np.ndarray:
    """Per-layer sparsity ``float64[n]`` in ``[target-lam, target+lam]`` and ``[0, 1]``, mean exactly ``target``.

    A more important layer (higher score) never gets a higher sparsity than a less important one.

    Example:
        >>> s = owl_sparsities(shapley_values, target=0.7, lam=0.08); s.mean()
        0.7
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size == 0:
        raise LayershapError("no layer scores given")
    if not np.isfinite(s).all():
        raise LayershapError("layer scores contain NaN or infinite values; recompute the scores")
    if not 0.0 <= target < 1.0:
        raise LayershapError(f"--sparsity must be in [0, 1); got {target}")
    if not lam >= 0.0:
        raise LayershapError(f"--lambda must be >= 0; got {lam}")
    lo, hi = max(0.0, target - lam), min(1.0, target + lam)
    span = s.max() - s.min()
    if span == 0.0 or lam == 0.0:
        return np.full(s.size, target)
    u = (s - s.min()) / span  # 0 = least important, 1 = most important
    base = target + lam * (1.0 - 2.0 * u)
    # mean(clip(base + c)) rises from lo (c = lo - base.max()) to hi (c = hi - base.min()); target lies between
    a, b = lo - base.max(), hi - base.min()
    for _ in range(200):
        mid = 0.5 * (a + b)
        if _mean_at(base, mid, lo, hi) < target:
            a = mid
        else:
            b = mid
    c = 0.5 * (a + b)
    # exact solve on the layers strictly inside the bounds at c (the mean is linear in c there)
    shifted = base + c
    free = (shifted > lo) & (shifted < hi)
    out = np.clip(shifted, lo, hi)
    if free.any():
        fixed_sum = out[~free].sum()
        c_exact = (target * s.size - fixed_sum - base[free].sum()) / free.sum()
        candidate = out.copy()
        candidate[free] = base[free] + c_exact
        if (candidate[free] >= lo).all() and (candidate[free] <= hi).all():
            out = candidate
    return out


def export_document(record: ScoresRecord, target: float, lam: float, source: str) -> dict:
    """The sparsity JSON (``format: layershap-sparsity``) for the scores of a :class:`ScoresRecord`.

    Example:
        >>> export_document(read_scores("scores.json"), 0.7, 0.08, "scores.json")["mean"]
        0.7
    """
    scores = record.scores.values
    ratios = owl_sparsities(scores, target, lam)
    return {
        "format": "layershap-sparsity",
        "format_version": 1,
        "model_id": record.model_id,
        "model_hash": record.model_hash,
        "n_layers": record.n_layers,
        "layers": list(range(record.n_layers)),
        "sparsities": [float(x) for x in ratios],
        "target": target,
        "lambda": lam,
        "mean": float(ratios.mean()),
        "mapping": "OWL-style bounded linear: higher score -> lower sparsity, within [target-lambda, target+lambda]",
        "index": record.scores.index,
        "method": record.scores.method,
        "scores": [float(x) for x in scores],
        "source_scores": source,
    }
