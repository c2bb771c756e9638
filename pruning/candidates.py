"""Which removal sets the plan search measures next: focused initial draws, the proposal model's ranking, one-swap
neighbours (:mod:`layershap.pruning.plan` drives them).

Example:
    >>> damage = loo_damage(masks, loss)                         # each layer's leave-one-out cost  # doctest: +SKIP
    >>> focused_sets(damage, 3, 6, np.random.default_rng(0), 0.5, exclude=set())  # doctest: +SKIP
    >>> ranked_sets(PairwiseModel.fit(masks, loss), 18, 3, top=5)  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from layershap.surrogate.pairwise import PairwiseModel

MAX_EXHAUSTIVE = 200_000
BEAM_WIDTH = 256


def loo_damage(masks: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Each layer's leave-one-out loss increase over the full model; ``nan`` where a row is missing."""
    n = masks.shape[1]
    full = masks.all(axis=1)
    damage = np.full(n, np.nan)
    single = (~masks).sum(axis=1) == 1
    if full.any():
        for m, v in zip(masks[single], loss[single]):
            damage[int(np.flatnonzero(~m)[0])] = v - float(loss[full][0])
    return damage


def focused_sets(damage: np.ndarray, k: int, count: int, rng: np.random.Generator, temperature: float,
                 exclude: set[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Up to ``count`` new removal sets of size ``k``, layers drawn without replacement with weights
    ``exp(-damage / temperature)`` (low leave-one-out damage = likely); sets in ``exclude`` are skipped."""
    n = len(damage)
    filled = np.where(np.isfinite(damage), damage, np.nanmax(damage) if np.isfinite(damage).any() else 0.0)
    logits = -filled / temperature
    weights = np.exp(logits - logits.max())
    weights /= weights.sum()
    out: list[tuple[int, ...]] = []
    seen = set(exclude)
    for _ in range(50 * count):
        if len(out) >= count or len(seen) - len(exclude) >= math.comb(n, k):
            break
        s = tuple(sorted(int(i) for i in rng.choice(n, size=k, replace=False, p=weights)))
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def ranked_sets(model: PairwiseModel, n: int, k: int, top: int) -> list[tuple[int, ...]]:
    """The ``top`` removal sets of size ``k`` with the lowest predicted loss: exhaustive when C(n, k) is at most
    :data:`MAX_EXHAUSTIVE`, else beam search (width :data:`BEAM_WIDTH`, one layer added per step); sets are
    scored by index (:meth:`PairwiseModel.predict_sets`), never as dense features."""
    if math.comb(n, k) <= MAX_EXHAUSTIVE:
        sets = np.array(list(itertools.combinations(range(n), k)), dtype=np.int64).reshape(-1, k)
    else:
        frontier = np.zeros((1, 0), dtype=np.int64)
        for size in range(1, k + 1):
            grown = sorted({tuple(sorted((*s, j))) for s in frontier.tolist() for j in range(n) if j not in s})
            grown_arr = np.array(grown, dtype=np.int64).reshape(-1, size)
            pred = model.predict_sets(grown_arr)
            frontier = grown_arr[np.argsort(pred, kind="stable")[: max(BEAM_WIDTH, top)]]
        sets = frontier
    pred = model.predict_sets(sets)
    order = np.argsort(pred, kind="stable")[:top]
    return [tuple(int(i) for i in sets[j]) for j in order]


def neighbours(best: tuple[int, ...], smaller: tuple[int, ...] | None, n: int) -> list[tuple[int, ...]]:
    """One-swap neighbours of ``best`` and the sets ``smaller + {j}`` (the best (K-1)-set grown by one layer)."""
    kept = [j for j in range(n) if j not in best]
    out = {tuple(sorted((set(best) - {i}) | {j})) for i in best for j in kept}
    if smaller is not None:
        out |= {tuple(sorted((*smaller, j))) for j in range(n) if j not in smaller}
    return sorted(out)
