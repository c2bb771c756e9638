"""Layer Shapley values, Banzhaf values and pruning-range semivalues over any value function: the estimator
choice (:func:`resolve_method`), one call for any index and method (:func:`compute_scores`), an ensemble's
scores with its disagreement in the standard errors (:func:`ensemble_scores`) and the text table.

A value function is ``v(masks: bool[k, n]) -> float[k]``, higher = better (module ``game``): a trained
surrogate, the oracle or a synthetic game. Estimators:

* exact streaming enumeration of all ``2^n`` masks (``n <= 24``), optionally with pairwise Shapley
  interactions — :func:`exact_semivalue` (module ``exact``);
* paired permutation sampling for the Shapley value — :func:`permutation_shapley`;
* size-stratified sampling for any semivalue — :func:`stratified_semivalue` (module ``montecarlo``).

Indices (module ``semivalues``): ``Index("shapley")``, ``Index("banzhaf")``, ``Index("semivalue", A, B)`` —
the pruning-range semivalue over ``A..B`` removed layers.

Example:
    >>> from layershap.shapley.estimate import compute_scores
    >>> from layershap.shapley.semivalues import Index
    >>> scores = compute_scores(surrogate, surrogate.n_layers, Index("semivalue", 1, 6), method="auto")  # doctest: +SKIP
    >>> scores.values, scores.stderr, scores.ranking()      # ranking: least important first  # doctest: +SKIP
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np

from layershap.core.errors import LayershapError

from .exact import DEFAULT_BATCH, check_exact_size, exact_interactions, exact_semivalue
from .game import Scores, ValueFunction
from .montecarlo import permutation_shapley, stratified_semivalue
from .semivalues import Index

METHODS = ("auto", "exact", "mc", "mc-permutation", "mc-stratified")
AUTO_EXACT_MAX = 22  # --method auto enumerates up to 2^22 masks (seconds on a surrogate), Monte Carlo above
DEFAULT_BUDGET = 500_000  # Monte Carlo evaluations: seconds on a surrogate


class Ensemble(Protocol):
    """A value function made of members: what :func:`ensemble_scores` needs."""

    n_layers: int

    @property
    def members(self) -> int: ...

    def member(self, j: int) -> ValueFunction: ...

    def __call__(self, masks: np.ndarray) -> np.ndarray: ...


def resolve_method(method: str, n: int, index: Index) -> str:
    """Concrete estimator for ``method``: ``auto`` -> ``exact`` if ``n <= 22`` else Monte Carlo; ``mc`` ->
    ``mc-permutation`` for the Shapley value, ``mc-stratified`` for other indices.
    """
    if method not in METHODS:
        raise LayershapError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if method == "auto":
        method = "exact" if n <= AUTO_EXACT_MAX else "mc"
    if method == "mc":
        method = "mc-permutation" if index.is_shapley(n) else "mc-stratified"
    if method == "mc-permutation" and not index.is_shapley(n):
        raise LayershapError(
            f"permutation sampling estimates the Shapley value only, not {index.name}; use --method mc-stratified"
        )
    return method


def compute_scores(
    v: ValueFunction,
    n: int,
    index: Index | None = None,
    method: str = "auto",
    *,
    budget: int = DEFAULT_BUDGET,
    seed: int = 0,
    interactions: bool = False,
    batch_size: int = DEFAULT_BATCH,
    progress: bool | None = None,
) -> Scores:
    """Per-layer scores of ``v`` on ``n`` layers with the chosen index and method (see :func:`resolve_method`).

    ``interactions=True`` adds the exact pairwise Shapley interaction matrix (``n <= 24``) to
    ``extra["interactions"]``, in the same pass for the exact method, in a second exact pass otherwise.

    Example:
        >>> s = compute_scores(lambda m: m.sum(1) * 1.0, 30, method="mc", budget=20_000, seed=0)
        >>> s.method, bool((s.values.round(6) == 1.0).all())
        ('mc-permutation', True)
    """
    index = Index("shapley") if index is None else index
    index.validate(n)
    concrete = resolve_method(method, n, index)
    start_time = time.perf_counter()
    if interactions:
        check_exact_size(n)
    if concrete == "exact":
        scores = exact_semivalue(v, n, index, interactions=interactions, batch_size=batch_size, progress=progress)
    elif concrete == "mc-permutation":
        scores = permutation_shapley(v, n, budget, seed=seed, batch_size=batch_size, progress=progress)
    else:
        scores = stratified_semivalue(v, n, budget, index, seed=seed, batch_size=batch_size, progress=progress)
    if interactions and "interactions" not in scores.extra:
        matrix = exact_interactions(v, n, batch_size=batch_size, progress=progress)
        scores.extra["interactions"] = matrix
        scores.extra["interaction_index"] = "shapley_interaction"
        scores.n_evals += 1 << n
    scores.extra["seconds"] = time.perf_counter() - start_time
    return scores


def ensemble_scores(ensemble: Ensemble, index: Index | None = None, method: str = "auto", **kwargs) -> Scores:
    """Scores of an ensemble value function, with the members' disagreement folded into the standard errors.

    ``ensemble``: a value function with ``n_layers``, ``members`` (count) and ``member(j)`` (member ``j`` alone
    as a value function), e.g. a :class:`~layershap.surrogate.checkpoint.Surrogate`.

    The values are :func:`compute_scores` on the ensemble mean. With K > 1 members the estimator also runs on
    each member alone (same seed, so Monte Carlo noise is shared) and the reported ``stderr`` becomes
    ``sqrt(estimator_se^2 + surrogate_se^2)``, ``surrogate_se = std over members / sqrt(K)``; both parts and
    the members' values are kept in ``extra``. Costs about twice the network evaluations of the mean alone.

    Example:
        >>> s = ensemble_scores(load_surrogate("runs/x/surrogate"), Index("semivalue", 1, 9))  # doctest: +SKIP
        >>> s.values, s.stderr, s.extra["surrogate_stderr"]  # doctest: +SKIP
    """
    n = ensemble.n_layers
    scores = compute_scores(ensemble, n, index, method, **kwargs)
    k = ensemble.members
    if k == 1:
        return scores
    member_kwargs = dict(kwargs, interactions=False)
    members = np.array([compute_scores(ensemble.member(j), n, index, method, **member_kwargs).values
                        for j in range(k)])
    surrogate_se = members.std(axis=0, ddof=1) / np.sqrt(k)
    scores.extra.update(
        members=k, member_values=members, estimator_stderr=scores.stderr, surrogate_stderr=surrogate_se,
        stderr_kind="sqrt(estimator_se^2 + (std over ensemble members / sqrt(members))^2)",
    )
    scores.stderr = np.sqrt(scores.stderr**2 + surrogate_se**2)
    scores.extra["member_evals"] = k * scores.n_evals  # n_evals stays the estimator's own budget
    return scores


def scores_table(scores: Scores, layer_names: list[str] | None = None) -> str:
    """Plain-text table: layer, score ± s.e., rank (1 = least important, removed first).

    Example:
        >>> print(scores_table(scores))  # doctest: +SKIP
    """
    names = layer_names or [str(i) for i in range(scores.n_layers)]
    rank = scores.prune_rank()
    width = max(5, max(len(x) for x in names))
    lines = [f"{'layer':>{width}}  {'score':>12}  {'± s.e.':>10}  {'rank':>4}"]
    for i in range(scores.n_layers):
        lines.append(
            f"{names[i]:>{width}}  {scores.values[i]:>12.6f}  {scores.stderr[i]:>10.6f}  {rank[i]:>4d}"
        )
    lines.append(f"rank 1 = least important (first to remove); index {scores.index}, method {scores.method}, "
                 f"{scores.n_evals:,} evaluations")
    return "\n".join(lines)
