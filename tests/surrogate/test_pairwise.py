"""The pairwise surrogate against games it can represent exactly, and its input checks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from layershap.core.errors import LayershapError
from layershap.core.masks import masks_from_removed
from layershap.surrogate.pairwise import PairwiseModel, pair_features

N = 7
RNG = np.random.default_rng(11)
A = RNG.uniform(0.05, 0.5, N)
W = np.triu(RNG.normal(0, 0.1, (N, N)), 1)


def log_nll(masks):
    r = (~masks).astype(float)
    return 1.2 + r @ A + np.einsum("ki,ij,kj->k", r, W, r)


def sets_up_to(k):
    return [s for size in range(k + 1) for s in itertools.combinations(range(N), size)]


def test_features_are_removed_indicators_and_their_pair_products():
    masks = np.array([[True, False, False, True]])
    f = pair_features(masks)
    r = np.array([0, 1, 1, 0.0])
    pairs = [r[i] * r[j] for i, j in itertools.combinations(range(4), 2)]
    np.testing.assert_array_equal(f[0], np.concatenate([r, pairs]))


def test_recovers_a_pairwise_log_game_on_unseen_sets():
    train = masks_from_removed(sets_up_to(3), N)
    model = PairwiseModel.fit(train, np.exp(log_nll(train)), alpha=1e-6)
    test = masks_from_removed([s for s in itertools.combinations(range(N), 4)], N)  # never seen: 4 removed
    np.testing.assert_allclose(model.predict_log_nll(test), log_nll(test), atol=2e-3)  # tiny ridge bias
    assert model.intercept == pytest.approx(1.2)  # anchored at the measured full model


def test_max_removed_ignores_rows_outside_the_regime():
    train = masks_from_removed(sets_up_to(2), N)
    y = np.exp(log_nll(train))
    far = masks_from_removed([tuple(range(5))], N)
    with_junk = PairwiseModel.fit(np.vstack([train, far]), np.append(y, 1e6), alpha=1e-6, max_removed=2)
    clean = PairwiseModel.fit(train, y, alpha=1e-6)
    np.testing.assert_allclose(with_junk.weights, clean.weights)
    assert with_junk.rows == len(train)


def test_bad_input_is_a_clear_error():
    train = masks_from_removed(sets_up_to(1), N)
    with pytest.raises(LayershapError, match="positive"):
        PairwiseModel.fit(train, np.zeros(len(train)))
    with pytest.raises(LayershapError, match="ridge"):
        PairwiseModel.fit(train, np.ones(len(train)), alpha=0)
    with pytest.raises(LayershapError, match="in its range"):
        PairwiseModel.fit(masks_from_removed([tuple(range(4))], N), np.ones(1), max_removed=2)


def test_the_fit_is_the_per_term_ridge_in_closed_form_and_sets_score_by_index():
    """Against the primal normal equations (many rows) and the dual (fewer rows than the 3,240 terms of 80
    layers); predict_sets equals the dense-feature prediction."""
    from layershap.core.masks import masks_from_removed
    from layershap.surrogate.pairwise import ALPHA_LINEAR, DEFAULT_ALPHA

    rng = np.random.default_rng(3)
    for n, rows in ((8, 200), (80, 150)):
        masks = rng.random((rows, n)) > 0.08
        masks[0] = True
        nll = 3.0 + (~masks).sum(1) * 0.05 + rng.random(rows) * 0.02
        model = PairwiseModel.fit(masks, nll)
        x = pair_features(masks)
        y = np.log(nll) - np.log(nll[masks.all(axis=1)]).mean()  # anchored at the full model's rows
        penalty = np.concatenate([np.full(n, ALPHA_LINEAR), np.full(x.shape[1] - n, DEFAULT_ALPHA)])
        expected = np.linalg.solve(x.T @ x + np.diag(penalty), x.T @ y)
        np.testing.assert_allclose(model.weights, expected, rtol=1e-6, atol=1e-9)
        sets = np.array([[0, 3, 5], [1, 2, n - 1]])
        np.testing.assert_allclose(model.predict_sets(sets), model.predict_log_nll(masks_from_removed(sets, n)))
