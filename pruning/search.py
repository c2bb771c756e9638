"""The best set of K layers to remove according to a value function (e.g. the surrogate), checked by the oracle.

Exhaustive over all C(n, K) removal sets when there are at most ``max_exhaustive`` of them (value function
called in batches), otherwise beam search (width ``beam_width``; width 1 is greedy). The top few
candidates are then re-measured with the oracle and the one the oracle likes best wins. This goes beyond
"remove the K lowest Shapley values", which ignores interactions between the removed layers.

Example:
    >>> res = search_and_verify(surrogate, oracle, n_layers=18, k=4, top=3)  # doctest: +SKIP
    >>> res.winner.removed, res.winner.predicted, res.winner.measured   # values: higher = better (-nll)  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from layershap.core.errors import LayershapError
from layershap.core.masks import check_removal_count, masks_from_removed
from layershap.shapley.game import ValueFunction, evaluate

MAX_EXHAUSTIVE = 1_000_000


@dataclass(frozen=True)
class Candidate:
    """A removal set with its predicted value (search value function) and, once re-measured, the oracle's."""

    removed: tuple[int, ...]
    predicted: float
    measured: float | None = None


@dataclass(frozen=True)
class SearchResult:
    """Outcome of :func:`search_and_verify`; ``winner`` is the candidate with the best oracle value."""

    k: int
    strategy: str
    candidates: tuple[Candidate, ...]
    winner: Candidate
    value_calls: int
    oracle_passes: int
    extra: dict = field(default_factory=dict)


def _combination_batches(n: int, k: int, batch_size: int) -> Iterator[np.ndarray]:
    it = itertools.combinations(range(n), k)
    while True:
        chunk = list(itertools.islice(it, batch_size))
        if not chunk:
            return
        yield np.array(chunk, dtype=np.int64).reshape(len(chunk), k)


def _check(n: int, k: int, top: int) -> None:
    check_removal_count(k, n)
    if top < 1:
        raise LayershapError(f"top must be >= 1, got {top}")


def _merge_top(best_sets: np.ndarray, best_vals: np.ndarray, sets: np.ndarray, vals: np.ndarray, top: int):
    all_sets = np.concatenate([best_sets, sets])
    all_vals = np.concatenate([best_vals, vals])
    # best value first; ties keep the earlier (lexicographically smaller) set
    order = np.lexsort((np.arange(len(all_vals)), -all_vals))[:top]
    return all_sets[order], all_vals[order]


def exhaustive_search(
    value: ValueFunction, n_layers: int, k: int, top: int = 5, batch_size: int = 65_536, progress: bool = True
) -> tuple[list[Candidate], int]:
    """All C(n, k) removal sets scored by ``value``: the ``top`` best (best first) and the number of calls.

    Example:
        >>> cands, n_calls = exhaustive_search(surrogate, 18, 4)    # n_calls == C(18, 4) == 3060  # doctest: +SKIP
    """
    _check(n_layers, k, top)
    total = math.comb(n_layers, k)
    best_sets = np.zeros((0, k), dtype=np.int64)
    best_vals = np.zeros(0)
    with tqdm(total=total, desc=f"exhaustive K={k}", disable=not progress, leave=False) as bar:
        for sets in _combination_batches(n_layers, k, batch_size):
            vals = evaluate(value, masks_from_removed(sets, n_layers))
            best_sets, best_vals = _merge_top(best_sets, best_vals, sets, vals, top)
            bar.update(len(sets))
    return [Candidate(tuple(int(i) for i in s), float(v)) for s, v in zip(best_sets, best_vals)], total


def beam_search(
    value: ValueFunction, n_layers: int, k: int, width: int = 64, top: int = 5, progress: bool = True
) -> tuple[list[Candidate], int]:
    """Beam search over removal sets grown one layer at a time, keeping the ``width`` best sets per size.

    Returns the ``top`` best sets of size ``k`` (best first) and the number of value-function calls.

    Example:
        >>> cands, n_calls = beam_search(surrogate, 64, 16, width=128)  # doctest: +SKIP
    """
    _check(n_layers, k, top)
    if width < 1:
        raise LayershapError(f"beam width must be >= 1, got {width}")
    beams = np.zeros((1, 0), dtype=np.int64)
    calls = 0
    vals = np.zeros(1)
    for size in tqdm(range(1, k + 1), desc=f"beam K={k}", disable=not progress, leave=False):
        grown = {}
        for b in beams:
            present = set(b.tolist())
            for j in range(n_layers):
                if j not in present:
                    grown.setdefault(tuple(sorted(present | {j})), None)
        sets = np.array(sorted(grown), dtype=np.int64).reshape(len(grown), size)
        vals = evaluate(value, masks_from_removed(sets, n_layers))
        calls += len(sets)
        keep = width if size < k else max(width, top)
        order = np.lexsort((np.arange(len(vals)), -vals))[:keep]
        beams, vals = sets[order], vals[order]
    return [Candidate(tuple(int(i) for i in s), float(v)) for s, v in zip(beams[:top], vals[:top])], calls


def best_removal_sets(
    value: ValueFunction,
    n_layers: int,
    k: int,
    top: int = 5,
    beam_width: int = 64,
    max_exhaustive: int = MAX_EXHAUSTIVE,
    progress: bool = True,
) -> tuple[list[Candidate], int, str]:
    """Exhaustive search when C(n, k) <= ``max_exhaustive``, else beam search: (candidates, calls, strategy).

    Example:
        >>> cands, calls, how = best_removal_sets(surrogate, 18, 4)     # how == "exhaustive"  # doctest: +SKIP
    """
    _check(n_layers, k, top)
    if math.comb(n_layers, k) <= max_exhaustive:
        cands, calls = exhaustive_search(value, n_layers, k, top=top, progress=progress)
        return cands, calls, "exhaustive"
    cands, calls = beam_search(value, n_layers, k, width=beam_width, top=top, progress=progress)
    return cands, calls, f"beam[{beam_width}]"


def search_and_verify(
    value: ValueFunction,
    oracle: ValueFunction,
    n_layers: int,
    k: int,
    top: int = 3,
    beam_width: int = 64,
    max_exhaustive: int = MAX_EXHAUSTIVE,
    progress: bool = True,
) -> SearchResult:
    """Search with ``value`` (cheap, e.g. the surrogate), re-measure the ``top`` candidates with ``oracle``.

    Both are value functions (higher = better; for the surrogate and the MaskedEvaluator that is ``-nll``).
    The winner is the candidate with the best oracle value; ``oracle_passes`` = candidates re-measured.

    Example:
        >>> res = search_and_verify(surrogate, MaskedEvaluator(model, windows), 18, 4)  # doctest: +SKIP
        >>> -res.winner.predicted, -res.winner.measured      # predicted and measured calibration NLL  # doctest: +SKIP
    """
    cands, calls, strategy = best_removal_sets(
        value, n_layers, k, top=top, beam_width=beam_width, max_exhaustive=max_exhaustive, progress=progress
    )
    sets = np.array([c.removed for c in cands], dtype=np.int64)
    measured = evaluate(oracle, masks_from_removed(sets, n_layers))
    verified = tuple(Candidate(c.removed, c.predicted, float(m)) for c, m in zip(cands, measured))
    winner = verified[int(np.argmax(measured))]
    return SearchResult(k, strategy, verified, winner, calls, len(verified))
