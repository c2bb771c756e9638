"""Per-layer sparsity ratios for Wanda/SparseGPT-style pruners, two mappings from per-layer values:

* :func:`owl_sparsities` — OWL's own formula (Yin et al. 2024, "Outlier Weighed Layerwise sparsity"), for
  outlier ratios ``D``: min-max normalise ``D`` onto ``[0, 2·lam]``, subtract the mean, add the target density
  ``1 - target``; that is each layer's density, and its sparsity is one minus it. In closed form, with
  ``u_l = (D_l - min D) / (max D - min D)``,

      sparsity_l = target + 2·lam·(mean(u) - u_l),

  so the mean is exactly the target, the layer with the most outliers is pruned least and the span
  ``max - min`` is exactly ``2·lam`` — but the values are *not* centred on the target: they lie in
  ``[target - 2·lam·(1 - mean(u)), target + 2·lam·mean(u)]``, a window that moves with the ratios' skew.
* :func:`bounded_sparsities` — layershap's bounded linear mapping, for layer scores: scores mapped linearly
  onto ``[target - lam, target + lam]`` (highest score -> lowest sparsity), then one common shift ``c`` applied
  and the result clipped to ``[max(0, target - lam), min(1, target + lam)]``, with ``c`` chosen so the mean is
  exactly the target. Every layer stays within ``lam`` of the target; on skewed values the span is then
  narrower than ``2·lam`` (it equals OWL's formula only when ``mean(u) = 1/2``, e.g. evenly spaced values).
  The mean of the clipped values is continuous and non-decreasing in ``c``, so ``c`` exists and is found by
  bisection plus an exact solve on the unclipped layers.

All equal values give every layer the target.

Example:
    >>> owl_sparsities(np.array([0.001, 0.001, 0.001, 0.001, 0.01]), target=0.7, lam=0.08).round(3)
    array([0.732, 0.732, 0.732, 0.732, 0.572])
    >>> bounded_sparsities(np.array([0.001, 0.001, 0.001, 0.001, 0.01]), target=0.7, lam=0.08).round(3)
    array([0.72, 0.72, 0.72, 0.72, 0.62])
    >>> export_document(read_scores("scores.json"), 0.7, 0.08, "scores.json")["sparsities"]   # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np

from layershap.core.errors import LayershapError
from layershap.shapley.scores_io import ScoresRecord

BOUNDED_MAPPING = ("layershap bounded linear: higher score -> lower sparsity, within [target-lambda, "
                   "target+lambda], shifted (with clipping) to mean exactly target")
OWL_MAPPING = "OWL: sparsity = target + 2*lambda*(mean(u) - u), u = min-max normalised outlier ratio"


def _checked(values: np.ndarray, target: float, lam: float, what: str) -> np.ndarray:
    s = np.asarray(values, dtype=np.float64).ravel()
    if s.size == 0:
        raise LayershapError(f"no layer {what} given")
    if not np.isfinite(s).all():
        raise LayershapError(f"layer {what} contain NaN or infinite values; recompute them")
    if not 0.0 <= target < 1.0:
        raise LayershapError(f"--sparsity must be in [0, 1); got {target}")
    if not lam >= 0.0:
        raise LayershapError(f"--lambda must be >= 0; got {lam}")
    return s


def owl_sparsities(ratios: np.ndarray, target: float, lam: float) -> np.ndarray:
    """OWL's per-layer sparsities ``float64[n]``: ``target + 2·lam·(mean(u) − u)``, ``u`` the min-max
    normalised outlier ratios (see the module doc); mean exactly ``target``, span exactly ``2·lam``.

    Raises :class:`LayershapError` when a layer would leave ``[0, 1)``, naming the largest ``lam`` that fits.

    Example:
        >>> owl_sparsities(np.array([0.01, 0.02, 0.04]), target=0.5, lam=0.1).round(4)
        array([0.5889, 0.5222, 0.3889])
    """
    d = _checked(ratios, target, lam, "outlier ratios")
    span = d.max() - d.min()
    if span == 0.0 or lam == 0.0:
        return np.full(d.size, float(target))
    u = (d - d.min()) / span
    out = target + 2.0 * lam * (u.mean() - u)
    if out.min() < 0.0 or out.max() >= 1.0:
        # the lowest layer sits 2*lam*(1 - mean u) below the target, the highest 2*lam*mean(u) above it
        fit = min(target / (2.0 * (1.0 - u.mean())), (1.0 - target) / (2.0 * u.mean()))
        raise LayershapError(
            f"--lambda {lam} is too large for --sparsity {target} with these outlier ratios: OWL's layer "
            f"sparsities would span {out.min():.4g}..{out.max():.4g}, outside [0, 1); use --lambda below {fit:.4g}"
        )
    return out


def _mean_at(base: np.ndarray, c: float, lo: float, hi: float) -> float:
    return float(np.clip(base + c, lo, hi).mean())


def bounded_sparsities(scores: np.ndarray, target: float, lam: float) -> np.ndarray:
    """Per-layer sparsity ``float64[n]`` in ``[target-lam, target+lam]`` and ``[0, 1]``, mean exactly ``target``
    (layershap's bounded linear mapping, see the module doc).

    A more important layer (higher score) never gets a higher sparsity than a less important one.

    Example:
        >>> bounded_sparsities(np.array([0.1, 0.5, 0.3]), target=0.7, lam=0.08)
        array([0.78, 0.62, 0.7 ])
    """
    s = _checked(scores, target, lam, "scores")
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
    """The sparsity JSON (``format: layershap-sparsity``) for the scores of a :class:`ScoresRecord`
    (:func:`bounded_sparsities` of the scores).

    Example:
        >>> export_document(read_scores("scores.json"), 0.7, 0.08, "scores.json")["mean"]   # doctest: +SKIP
        0.7
    """
    scores = record.scores.values
    ratios = bounded_sparsities(scores, target, lam)
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
        "mapping": BOUNDED_MAPPING,
        "index": record.scores.index,
        "method": record.scores.method,
        "scores": [float(x) for x in scores],
        "source_scores": source,
    }
