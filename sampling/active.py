"""Active-sampling mask picks: among unmeasured masks in the pruning range, those a scoring callable (e.g. the
surrogate ensemble's spread) rates most uncertain, an equal share per removed-layer count.

Example:
    >>> picked, spread = pick_uncertain(store.masks, 18, [1, 2, 3], surrogate.predict_std, batch=32, seed=1)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from .stratified import stratified_masks


def select_uncertain(candidates: np.ndarray, spread: np.ndarray, batch: int) -> np.ndarray:
    """Pick ``batch`` candidate rows with the largest ``spread``, an equal share per removed-layer count.

    A count with fewer candidates than its share passes the rest to the highest-spread candidates left.
    Ties are broken by candidate order. Returns row indices into ``candidates``.

    Example:
        >>> select_uncertain(masks, surrogate.predict_std(masks), 32)
    """
    if batch >= len(candidates):
        return np.arange(len(candidates))
    removed = (~candidates).sum(axis=1)
    counts = np.unique(removed)
    share = batch // len(counts)
    extra = batch - share * len(counts)
    chosen: list[int] = []
    for i, r in enumerate(counts):
        rows = np.flatnonzero(removed == r)
        order = rows[np.argsort(-spread[rows], kind="stable")]
        chosen += order[: share + (1 if i < extra else 0)].tolist()
    if len(chosen) < batch:
        rest = np.setdiff1d(np.arange(len(candidates)), chosen)
        chosen += rest[np.argsort(-spread[rest], kind="stable")][: batch - len(chosen)].tolist()
    return np.array(sorted(chosen), dtype=np.int64)


def available_masks(stored: np.ndarray, n: int, strata: Sequence[int]) -> int:
    """How many masks with a removed-layer count in ``strata`` are not in ``stored`` yet.

    Example:
        >>> available_masks(np.ones((1, 4), bool), 4, [1])
        4
    """
    removed = (~stored).sum(axis=1) if len(stored) else np.zeros(0, int)
    return sum(math.comb(n, r) - int((removed == r).sum()) for r in strata)


def pick_uncertain(
    stored: np.ndarray,
    n: int,
    strata: Sequence[int],
    score: Callable[[np.ndarray], np.ndarray],
    batch: int,
    *,
    pool: int = 4096,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw up to ``pool`` unmeasured candidates in ``strata`` (seeded, stratified, none in ``stored``), score
    them with ``score(masks) -> float[k]`` and keep the ``batch`` highest-scoring ones (:func:`select_uncertain`).

    Returns ``(masks bool[b, n], their scores float64[b])``; never a mask in ``stored``.

    Example:
        >>> masks, spread = pick_uncertain(store.masks, 18, range(1, 10), surrogate.predict_std, 32, seed=3)
    """
    k_pool = min(pool, available_masks(stored, n, strata))
    candidates = stratified_masks(n, k_pool, seed=seed, removed=strata, include_loo=False, exclude=stored)
    spread = np.asarray(score(candidates), dtype=np.float64)
    chosen = select_uncertain(candidates, spread, batch)
    return candidates[chosen], spread[chosen]
