"""The value-function contract every estimator relies on, and the :class:`Scores` result of every estimator.

A value function is ``v(masks: bool[k, n]) -> float[k]``, higher = better (``-nll`` for a surrogate or the
oracle, or a synthetic game). Estimators and searches call it through :func:`evaluate`, which checks the shape
and finiteness of what comes back.

Example:
    >>> v = lambda m: m.astype(float) @ np.arange(3.0)     # an additive game
    >>> evaluate(v, masks_from_ints(np.arange(8), 3))       # all 8 coalitions of 3 players  # doctest: +SKIP
    array([0., 0., 1., 1., 2., 2., 3., 3.])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

ValueFunction = Callable[[np.ndarray], np.ndarray]


@dataclass
class Scores:
    """Per-layer scores from one estimator.

    values: float64[n] (higher = more important); stderr: float64[n] (0 for exact methods);
    method: ``exact`` | ``mc-permutation`` | ``mc-stratified``; index: ``shapley`` | ``semivalue[A:B]`` |
    ``banzhaf``; n_evals: value-function evaluations used; extra: efficiency check, interactions, seconds, ...
    """

    values: np.ndarray
    stderr: np.ndarray
    method: str
    index: str
    n_evals: int
    extra: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.values.shape[0])

    def ranking(self) -> np.ndarray:
        """Layer indices, least important (lowest score) first; ties keep layer order."""
        return np.argsort(self.values, kind="stable")

    def prune_rank(self) -> np.ndarray:
        """1-based position of each layer in :meth:`ranking` (1 = least important, removed first)."""
        rank = np.empty(self.n_layers, dtype=np.int64)
        rank[self.ranking()] = np.arange(1, self.n_layers + 1)
        return rank


def evaluate(v: ValueFunction, masks: np.ndarray) -> np.ndarray:
    """Call ``v`` on ``bool[k, n]`` masks and return ``float64[k]``; a wrong shape or a non-finite value raises."""
    out = v(masks)
    if hasattr(out, "detach"):  # a torch tensor
        out = out.detach().cpu().numpy()
    values = np.asarray(out, dtype=np.float64)
    if values.shape != (masks.shape[0],):
        values = values.reshape(-1) if values.size == masks.shape[0] else values
        if values.shape != (masks.shape[0],):
            raise ValueError(
                f"the value function returned shape {np.shape(out)} for {masks.shape[0]} masks; "
                "it must return one number per mask (float[k])"
            )
    if not np.isfinite(values).all():
        bad = np.flatnonzero(~np.isfinite(values))[:5]
        raise FloatingPointError(f"the value function returned non-finite values for masks {masks[bad].astype(int)}")
    return values
