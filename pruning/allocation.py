"""Per-layer sparsity budgets whose mean is exactly the target: uniform, OWL outlier ratios, layer scores.

* ``uniform``: every layer gets the target.
* ``owl`` (Outlier Weighed Layerwise sparsity): a layer's *outlier ratio* is the fraction of its Wanda scores
  ``|W| * ||X||`` (all its linear weights together) above ``m`` times their mean (``m = 5`` as in the paper);
  layers with more outliers are pruned less, through OWL's own formula
  (:func:`layershap.pruning.sparsity.owl_sparsities`: ``target + 2·lam·(mean(u) − u)``, ``u`` the min-max
  normalised ratios; span exactly ``2·lam``).
* ``scores``: layer scores (Shapley value, semivalue, ...) from a layershap scores JSON; more important
  layers are pruned less, through layershap's bounded linear mapping
  (:func:`layershap.pruning.sparsity.bounded_sparsities`: every layer within ``lam`` of the target).

``lam`` must keep every layer inside ``[0, 1)``.

Example:
    >>> layer_budgets("scores", 18, target=0.7, lam=0.08, values=np.asarray(doc["scores"]))  # doctest: +SKIP
    >>> outlier_ratio(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 100.0]), m=5)
    0.1
"""

from __future__ import annotations

import numpy as np
import torch

from layershap.core.errors import LayershapError

from .sparsity import bounded_sparsities, owl_sparsities

ALLOCATIONS = ("uniform", "owl", "scores")
OWL_M = 5.0


def check_budget(target: float, lam: float, allocation: str) -> None:
    """Raise a :class:`LayershapError` for a target outside ``[0, 1)`` or a ``lam`` that leaves ``[0, 1)``.

    ``scores``: every layer lies in ``[target - lam, target + lam]``, so that window must fit in ``[0, 1)``.
    ``owl``: OWL's span is exactly ``2·lam``, so ``2·lam < 1`` is checked here; where the window lies depends on
    the outlier ratios, so :func:`~layershap.pruning.sparsity.owl_sparsities` checks the values themselves.

    Example:
        >>> check_budget(0.7, 0.4, "scores")   # LayershapError: 0.7 + 0.4 reaches 1  # doctest: +SKIP
    """
    if not isinstance(target, (int, float)) or not 0.0 <= target < 1.0:
        raise LayershapError(f"--sparsity must be a fraction in [0, 1), e.g. 0.6; got {target}")
    if allocation not in ALLOCATIONS:
        raise LayershapError(f"--allocation {allocation!r} is not one of {', '.join(ALLOCATIONS)}")
    if allocation == "uniform":
        return
    if not lam >= 0.0:
        raise LayershapError(f"--lambda must be >= 0; got {lam}")
    if allocation == "owl":
        if 2.0 * lam >= 1.0:
            raise LayershapError(f"--lambda {lam} is too large for OWL: its layer sparsities span 2 x lambda = "
                                 f"{2 * lam:.4g}, which cannot fit in [0, 1); use --lambda below 0.5")
        return
    if target + lam >= 1.0 or target - lam < 0.0:
        limit = min(target, 1.0 - target)
        raise LayershapError(
            f"--lambda {lam} is too large for --sparsity {target}: layer sparsities would span "
            f"{target - lam:.4g}..{target + lam:.4g}, outside [0, 1); use --lambda below {limit:.4g}"
        )


def outlier_ratio(metric: torch.Tensor, m: float = OWL_M) -> float:
    """Fraction of the entries of ``metric`` (any shape) strictly above ``m`` times their mean.

    Example:
        >>> outlier_ratio(torch.tensor([1.0, 1.0, 1.0, 13.0]), m=2.0)   # mean 4, threshold 8
        0.25
    """
    flat = metric.reshape(-1).double()
    return float((flat > m * flat.mean()).sum().item() / flat.numel())


def layer_budgets(
    allocation: str, n_layers: int, target: float, lam: float, values: np.ndarray | None = None
) -> np.ndarray:
    """Per-layer sparsities ``float64[n_layers]`` with mean exactly ``target``.

    ``values``: outlier ratios (``owl``, OWL's formula) or layer scores (``scores``, the bounded mapping),
    higher = pruned less; unused for ``uniform``.

    Example:
        >>> layer_budgets("owl", 3, 0.5, 0.1, np.array([0.01, 0.03, 0.02]))
        array([0.6, 0.4, 0.5])
    """
    check_budget(target, lam, allocation)
    if allocation == "uniform":
        return np.full(n_layers, float(target))
    if values is None:
        raise LayershapError(f"--allocation {allocation} needs per-layer values")
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size != n_layers:
        raise LayershapError(
            f"{values.size} layer values for a model with {n_layers} decoder layers; "
            "use scores computed for this model"
        )
    return owl_sparsities(values, target, lam) if allocation == "owl" else bounded_sparsities(values, target, lam)


def zero_counts(budgets: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Whole numbers of weights to prune per layer: ``budgets * sizes`` by largest remainders (``int64``).

    Their sum is ``round(sum(budgets * sizes))``: with equal layer sizes, the target times all weights.

    Example:
        >>> zero_counts(np.array([0.25, 0.75]), np.array([10, 10]))
        array([3, 7])
    """
    from .wanda import apportion

    exact = np.asarray(budgets, dtype=np.float64) * np.asarray(sizes, dtype=np.float64)
    return apportion(exact, round(float(exact.sum())))


def group_counts(budgets: np.ndarray, m: int) -> np.ndarray:
    """Weights pruned per group of ``m`` in each layer for a mixed N:M pattern (OWL's mixed N:M), ``int64``.

    Rounds ``budgets * m`` by largest remainders so that the mean stays ``mean(budgets) * m`` when that is
    whole; with uniform budgets every layer gets the same count.

    Example:
        >>> group_counts(np.array([0.5, 0.5]), 4), group_counts(np.array([0.625, 0.375]), 8)
        (array([2, 2]), array([5, 3]))
    """
    from .wanda import apportion

    exact = np.asarray(budgets, dtype=np.float64) * m
    return apportion(exact, round(float(exact.sum())))
