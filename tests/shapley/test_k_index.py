"""The index for K against a brute-force average of marginal contributions with K-1 other layers removed."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from layershap.core.errors import LayershapError
from layershap.shapley.exact import exact_semivalue
from layershap.shapley.semivalues import Index, choose_index

N = 6
RNG = np.random.default_rng(3)
W1 = RNG.normal(size=N)
W2 = RNG.normal(size=(N, N))
W3 = RNG.normal(size=(N, N, N))


def game(masks: np.ndarray) -> np.ndarray:
    """A game with single, pair and triple terms on the kept layers (nothing additive about it)."""
    x = masks.astype(float)
    return x @ W1 + np.einsum("ki,ij,kj->k", x, W2, x) + 0.3 * np.einsum("ki,kj,kl,ijl->k", x, x, x, W3)


def brute_k_index(k: int) -> np.ndarray:
    """phi_i = mean over sets R of k-1 other removed layers of v(all but R) - v(all but R and i)."""
    phi = np.zeros(N)
    for i in range(N):
        others = [j for j in range(N) if j != i]
        diffs = []
        for removed in itertools.combinations(others, k - 1):
            with_i = np.ones(N, bool)
            with_i[list(removed)] = False
            without_i = with_i.copy()
            without_i[i] = False
            diffs.append(game(with_i[None])[0] - game(without_i[None])[0])
        phi[i] = np.mean(diffs)
    return phi


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_k_index_equals_the_brute_force_average(k):
    scores = exact_semivalue(game, N, Index("k", k), progress=False)
    np.testing.assert_allclose(scores.values, brute_k_index(k), rtol=1e-10, atol=1e-10)
    assert scores.index == f"k[{k}]"


def test_k_index_1_is_leave_one_out():
    full = game(np.ones((1, N), bool))[0]
    loo = np.array([full - game((~np.eye(N, dtype=bool))[i][None])[0] for i in range(N)])
    np.testing.assert_allclose(exact_semivalue(game, N, Index("k", 1), progress=False).values, loo, atol=1e-12)


def test_k_index_choice_and_coverage():
    chosen = choose_index("k", "4", [0, 1, 2, 3, 4], 8)
    assert chosen.name == "k[4]" and chosen.removed_counts_used(8) == [3, 4]
    with pytest.raises(LayershapError, match="--sizes K"):
        choose_index("k", None, [0, 1, 2], 8)
    with pytest.raises(LayershapError, match="not a range"):
        choose_index("k", "1:3", [0, 1, 2, 3], 8)
    with pytest.raises(LayershapError):
        choose_index("k", "9", [0, 1], 8).validate(8)
