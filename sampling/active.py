"""Active-sampling mask picks: among unmeasured masks in the pruning range, those the surrogate ensemble's
members disagree on most, an equal share per removed-layer count and, within a count, one pick per band of
predicted level, so the level of a mask never decides its pick.

Why bands: the members' disagreement grows with the predicted nll itself (masks that remove a cornerstone
layer are far from every training row), in nats and in log-nll alike; ranked on it alone, the picks are
catastrophic masks (Gemma-3-270M's committed surrogate, 32 picks from 4,096 candidates: 32 in nats and 31-32 in
log-nll remove a cornerstone layer, against 54-56 % of the pool; with the bands, 19 = 59 %). Within a band of
similar predicted level the spread compares like with like, and the bands cover the pool's whole range.

Example:
    >>> picked, spread = pick_uncertain(store.masks, 18, [1, 2, 3], disagreement, batch=32, seed=1)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from .stratified import stratified_masks


def select_uncertain(candidates: np.ndarray, spread: np.ndarray, batch: int,
                     level: np.ndarray | None = None) -> np.ndarray:
    """Pick ``batch`` candidate rows: an equal share per removed-layer count, and within each count its share
    ``q`` of picks taken one per band: the count's candidates sorted by ``level`` (e.g. the ensemble's
    predicted log-nll) and cut into ``q`` equal bands, each giving its largest ``spread``. Without ``level`` a
    count gives its ``q`` largest spreads.

    Counts with fewer candidates than their share give them all; the picks left over are taken the same way
    (one per ``level`` band) from all candidates not chosen yet. Ties are broken by candidate order. Returns
    sorted row indices into ``candidates``.

    Example:
        >>> select_uncertain(masks, spread, 32, level=predicted_log_nll)  # doctest: +SKIP
    """
    if batch >= len(candidates):
        return np.arange(len(candidates))
    spread = np.asarray(spread, dtype=np.float64)
    level = np.zeros(len(candidates)) if level is None else np.asarray(level, dtype=np.float64)
    if spread.shape != (len(candidates),) or level.shape != (len(candidates),):
        raise ValueError(f"{len(candidates)} candidates need as many spreads and levels; got {spread.shape}, "
                         f"{level.shape}")
    removed = (~candidates).sum(axis=1)
    counts = np.unique(removed)
    share = batch // len(counts)
    extra = batch - share * len(counts)
    chosen: list[int] = []
    for i, r in enumerate(counts):
        chosen += _banded(np.flatnonzero(removed == r), spread, level, share + (1 if i < extra else 0))
    if len(chosen) < batch:
        rest = np.setdiff1d(np.arange(len(candidates)), chosen)
        chosen += _banded(rest, spread, level, batch - len(chosen))
    return np.array(sorted(chosen), dtype=np.int64)


def _banded(rows: np.ndarray, spread: np.ndarray, level: np.ndarray, quota: int) -> list[int]:
    """The largest ``spread`` of each of ``quota`` equal bands of ``rows`` sorted by ``level`` (all rows when
    there are no more than ``quota``)."""
    if quota <= 0:
        return []
    if len(rows) <= quota:
        return rows.tolist()
    rows = rows[np.argsort(level[rows], kind="stable")]
    if not np.ptp(level[rows]) > 0:  # one level (or none given): the quota largest spreads
        return rows[np.argsort(-spread[rows], kind="stable")][:quota].tolist()
    return [int(band[np.argmax(spread[band])]) for band in np.array_split(rows, quota)]


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
    disagreement: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    batch: int,
    *,
    pool: int = 4096,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw up to ``pool`` unmeasured candidates in ``strata`` (seeded, stratified, none in ``stored``), rate
    them with ``disagreement(masks) -> (spread float[k], level float[k])`` and keep ``batch`` of them
    (:func:`select_uncertain`: per removed-layer count, the largest spread of each level band).

    Returns ``(masks bool[b, n], their spreads float64[b])``; never a mask in ``stored``.

    Example:
        >>> masks, spread = pick_uncertain(store.masks, 18, range(1, 10), disagreement, 32, seed=3)  # doctest: +SKIP
    """
    k_pool = min(pool, available_masks(stored, n, strata))
    candidates = stratified_masks(n, k_pool, seed=seed, removed=strata, include_loo=False, exclude=stored)
    spread, level = disagreement(candidates)
    spread = np.asarray(spread, dtype=np.float64)
    chosen = select_uncertain(candidates, spread, batch, level=level)
    return candidates[chosen], spread[chosen]
