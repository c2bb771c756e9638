"""A pairwise surrogate of the pruning regime: log(nll) as a constant, one term per removed layer and one term per
removed pair, fitted in closed form by ridge regression.

The plan search (:mod:`layershap.pruning.plan`) asks one question many times: which sets of K layers, removed
together, hurt least? Near the full model the game is dominated by each layer's own cost and by the
interactions between pairs of removed layers (removing 7 is harmless alone and fatal with 8), which this model
has as explicit terms. It is fitted on the rows with at most ``max_removed`` layers removed, where plans live,
so the catastrophic masks that dominate a mean-squared error over all rows cannot pull it away; the ridge
penalty shrinks the pair terms the data do not support towards zero (towards the additive model). Fitting takes
milliseconds (in the dual, rows x rows, when there are fewer rows than terms: 80 layers have 3,240), so the plan
loop refits it after every round of oracle measurements. Scoring removal sets reads the weights by index
(:meth:`PairwiseModel.predict_sets`: intercept + sum of w_i + sum of W_ij over the set's pairs), never building
the dense pair features of millions of candidate sets. The MLP ensemble (:mod:`layershap.surrogate.train`)
remains the surrogate of the whole game, for scores and the service.

The regression target is ``log(loss + offset)``: ``offset`` 0 for the NLL, a small floor for a divergence whose
full-model value is 0 (:func:`~layershap.oracle.measurement.log_offset`).

Example:
    >>> model = PairwiseModel.fit(masks, nll, max_removed=6)  # doctest: +SKIP
    >>> model.predict_nll(masks_from_removed([[7, 8]], 18))        # predicted nll of removing layers 7 and 8  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import Ridge

from layershap.core.errors import LayershapError
from layershap.core.masks import check_masks

DEFAULT_ALPHA = 1.0  # ridge penalty of the pair terms (log-nll units); the per-layer terms get ALPHA_LINEAR
ALPHA_LINEAR = 1e-3
def pair_features(masks: np.ndarray) -> np.ndarray:
    """``[removed_i for i] + [removed_i * removed_j for i < j]`` as float64 ``[k, n + n(n-1)/2]``.

    Example:
        >>> pair_features(np.array([[False, False, True]])).tolist()
        [[1.0, 1.0, 0.0, 1.0, 0.0, 0.0]]
    """
    r = (~np.asarray(masks, dtype=bool)).astype(np.float64)
    i, j = np.triu_indices(r.shape[1], 1)
    return np.concatenate([r, r[:, i] * r[:, j]], axis=1)


@dataclass(frozen=True)
class PairwiseModel:
    """``log nll(mask) = intercept + sum_i w_i r_i + sum_{i<j} w_ij r_i r_j`` with ``r = removed``."""

    n_layers: int
    intercept: float
    weights: np.ndarray
    rows: int
    offset: float = 0.0

    @classmethod
    def fit(cls, masks: np.ndarray, nll: np.ndarray, *, alpha: float = DEFAULT_ALPHA,
            max_removed: int | None = None, offset: float = 0.0) -> PairwiseModel:
        """Ridge fit of ``log(nll + offset)`` on the rows with at most ``max_removed`` layers removed (all rows
        when None).

        The intercept is the full model's measured value when the rows hold it (the anchor every plan is
        compared with), else the mean. Raises :class:`LayershapError` without rows in range.

        Example:
            >>> PairwiseModel.fit(masks, nll, max_removed=6).predict_nll(masks[:3])  # doctest: +SKIP
        """
        masks = np.asarray(masks)
        masks = check_masks(masks, masks.shape[-1])
        nll = np.asarray(nll, dtype=np.float64).reshape(-1)
        if len(nll) != len(masks):
            raise LayershapError(f"{len(masks)} masks but {len(nll)} nll values")
        if alpha <= 0:
            raise LayershapError(f"the ridge penalty must be positive, got {alpha}")
        if max_removed is not None:
            keep = (~masks).sum(axis=1) <= max_removed
            masks, nll = masks[keep], nll[keep]
        if len(nll) == 0 or not (nll + offset > 0).all() or not np.isfinite(nll).all():
            raise LayershapError("the pairwise model needs finite, positive loss values of masks in its range")
        n = masks.shape[1]
        y = np.log(nll + offset)
        full = masks.all(axis=1)
        intercept = float(y[full].mean()) if full.any() else float(y.mean())
        x = pair_features(masks)
        penalty = np.concatenate([np.full(n, ALPHA_LINEAR), np.full(x.shape[1] - n, alpha)])
        target = y - intercept
        # scikit-learn's ridge on features scaled by 1/sqrt(penalty) is exactly the ridge with per-term penalties;
        # it solves in the dual (rows x rows) when there are fewer rows than terms (80 layers: 3,240 terms)
        root = np.sqrt(penalty)
        ridge = Ridge(alpha=1.0, fit_intercept=False, solver="cholesky").fit(x / root, target)
        weights = ridge.coef_ / root
        return cls(n, intercept, weights, len(nll), float(offset))

    def pair_matrix(self) -> np.ndarray:
        """The pair weights as a symmetric ``[n, n]`` matrix with a zero diagonal."""
        n = self.n_layers
        matrix = np.zeros((n, n))
        i, j = np.triu_indices(n, 1)
        matrix[i, j] = matrix[j, i] = self.weights[n:]
        return matrix

    def predict_sets(self, sets: np.ndarray) -> np.ndarray:
        """Predicted ``log(loss + offset)`` of removal sets given as layer indices ``int[m, K]``, by index: no
        feature matrix, so millions of sets cost ``m x K^2`` reads.

        Example:
            >>> model.predict_sets(np.array([[7, 8], [8, 9]]))      # two 2-layer removals  # doctest: +SKIP
        """
        sets = np.asarray(sets, dtype=np.int64)
        if sets.ndim != 2:
            raise LayershapError(f"removal sets must be shaped (m, K); got {sets.shape}")
        linear = self.weights[: self.n_layers]
        pairs = self.pair_matrix()
        out = self.intercept + linear[sets].sum(axis=1)
        for a in range(sets.shape[1]):
            for b in range(a + 1, sets.shape[1]):
                out += pairs[sets[:, a], sets[:, b]]
        return out

    def predict_log_nll(self, masks: np.ndarray) -> np.ndarray:
        """Predicted ``log(loss + offset)`` per mask: ``float64[k]``."""
        return self.intercept + pair_features(check_masks(masks, self.n_layers)) @ self.weights

    def predict_nll(self, masks: np.ndarray) -> np.ndarray:
        """Predicted loss (nats) per mask: ``float64[k]``."""
        return np.exp(self.predict_log_nll(masks)) - self.offset

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        """Value function (higher = better): ``-predict_nll``."""
        return -self.predict_nll(masks)
