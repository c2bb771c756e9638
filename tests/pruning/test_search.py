"""Subset search on synthetic games whose optimum is known by brute-force enumeration in the test."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from layershap.core.errors import LayershapError, MaskError
from layershap.core.masks import masks_from_removed
from layershap.pruning.search import (
    beam_search,
    best_removal_sets,
    exhaustive_search,
    search_and_verify,
)


def pair_game(n: int, seed: int):
    """v(mask) = -(sum of removed costs) + sum of pairwise bonuses over removed pairs (random, seeded)."""
    rng = np.random.default_rng(seed)
    costs = rng.uniform(0.5, 2.0, n)
    bonus = np.triu(rng.uniform(0.0, 1.5, (n, n)), 1)

    def v(masks: np.ndarray) -> np.ndarray:
        r = (~np.asarray(masks, bool)).astype(float)
        return -(r @ costs) + np.einsum("ki,ij,kj->k", r, bonus, r)

    return v


def brute_force(v, n: int, k: int) -> list[tuple[tuple[int, ...], float]]:
    """Every removal set of size k with its value, best first (one mask at a time, no batching)."""
    rows = []
    for combo in itertools.combinations(range(n), k):
        mask = np.ones((1, n), bool)
        mask[0, list(combo)] = False
        rows.append((combo, float(v(mask)[0])))
    return sorted(rows, key=lambda r: -r[1])


def test_removal_masks():
    assert masks_from_removed(np.array([[0, 2], [1, 3]]), 4).astype(int).tolist() == [[0, 1, 0, 1], [1, 0, 1, 0]]
    # sets of different sizes, one row each: the removed layers are exactly the named ones
    sets = [(), (3,), (0, 2), (1, 2, 3)]
    masks = masks_from_removed(sets, 4)
    assert [tuple(np.flatnonzero(~m).tolist()) for m in masks] == sets
    assert masks_from_removed([], 4).shape == (0, 4)  # no set, no row
    assert masks_from_removed([()], 4).tolist() == [[True] * 4]  # one empty set: the full model
    with pytest.raises(MaskError, match="out of range"):
        masks_from_removed([(), (4,)], 4)
    with pytest.raises(MaskError, match="duplicates"):
        masks_from_removed([(1,), (2, 2)], 4)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_exhaustive_finds_the_known_optimum(k):
    n = 9
    v = pair_game(n, seed=k)
    expected = brute_force(v, n, k)
    cands, calls = exhaustive_search(v, n, k, top=4, batch_size=13, progress=False)
    assert calls == math.comb(n, k)
    assert [c.removed for c in cands] == [e[0] for e in expected[:4]]
    np.testing.assert_allclose([c.predicted for c in cands], [e[1] for e in expected[:4]], rtol=1e-12)


def test_beam_search_on_a_game_where_greedy_is_optimal():
    costs = np.array([3.0, 0.2, 5.0, 0.1, 2.5, 0.7, 4.0, 0.4, 1.1, 6.0, 0.9, 3.3])

    def additive(masks):
        return -((~np.asarray(masks, bool)) * costs).sum(1)

    for width in (1, 4):
        cands, _ = beam_search(additive, 12, 5, width=width, top=1, progress=False)
        assert cands[0].removed == tuple(sorted(np.argsort(costs)[:5]))
        assert cands[0].predicted == pytest.approx(-np.sort(costs)[:5].sum())
    # width 1: 12 + 11 + 10 + 9 + 8 sets scored
    assert beam_search(additive, 12, 5, width=1, top=1, progress=False)[1] == 50
    cands, _, how = best_removal_sets(additive, 12, 5, max_exhaustive=10, progress=False)
    assert how == "beam[64]" and cands[0].removed == (1, 3, 5, 7, 10)


def test_beam_wider_than_one_escapes_the_greedy_trap():
    # removing 0 alone is cheapest, but {1, 2} together is the best pair
    def v(masks):
        r = ~np.asarray(masks, bool)
        return -(r * np.array([1.0, 2.0, 2.0, 3.0])).sum(1) + 3.5 * (r[:, 1] & r[:, 2])

    assert beam_search(v, 4, 2, width=1, top=1, progress=False)[0][0].removed == (0, 1)
    assert beam_search(v, 4, 2, width=2, top=1, progress=False)[0][0].removed == (1, 2)
    assert exhaustive_search(v, 4, 2, top=1, progress=False)[0][0].removed == (1, 2)


def test_search_and_verify_picks_the_oracle_best_candidate():
    n, k = 8, 3
    truth = pair_game(n, seed=11)
    ranked = brute_force(truth, n, k)
    true_best = ranked[0][0]
    # a surrogate that is right about the top-3 sets but puts the true best third
    order = {ranked[0][0]: 0.0, ranked[1][0]: 2.0, ranked[2][0]: 1.0}

    def surrogate(masks):
        out = truth(masks) - 10.0
        for i, m in enumerate(np.asarray(masks, bool)):
            key = tuple(np.flatnonzero(~m))
            if key in order:
                out[i] = 100.0 + order[key]
        return out

    calls = []

    def oracle(masks):
        calls.append(len(masks))
        return truth(masks)

    res = search_and_verify(surrogate, oracle, n, k, top=3, progress=False)
    assert res.candidates[0].removed == ranked[1][0]  # the surrogate's favourite
    assert res.winner.removed == true_best
    assert res.winner.measured == pytest.approx(ranked[0][1])
    assert res.winner.predicted == pytest.approx(100.0)
    assert res.oracle_passes == 3 and calls == [3]
    assert res.value_calls == math.comb(n, k) and res.strategy == "exhaustive"


def test_bad_sizes():
    with pytest.raises(LayershapError, match="choose 1 <= K"):
        exhaustive_search(lambda m: np.zeros(len(m)), 4, 4)
    with pytest.raises(LayershapError, match="beam width"):
        beam_search(lambda m: np.zeros(len(m)), 4, 2, width=0)
