"""Shapley / Banzhaf / pruning-range semivalue estimators against closed forms, brute force and axioms."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from layershap.core.errors import LayershapError
from layershap.shapley.estimate import compute_scores, resolve_method
from layershap.shapley.exact import EfficiencyError, exact_interactions, exact_semivalue
from layershap.shapley.montecarlo import permutation_shapley, stratified_semivalue
from layershap.shapley.semivalues import Index, default_index, uncovered_counts

# ---------------------------------------------------------------- synthetic games with closed forms


def additive_game(w: np.ndarray):
    """v(S) = Σ_{i∈S} w_i: every semivalue is w."""
    return lambda m: m.astype(np.float64) @ w


def unanimity_game(n: int, team: list[int], scale: float = 1.0):
    """u_T(S) = scale if T ⊆ S: Shapley scale/|T| on T, Banzhaf scale/2^(|T|−1) on T, 0 elsewhere."""
    t = np.zeros(n, bool)
    t[team] = True
    return lambda m: scale * np.all(m[:, t], axis=1).astype(np.float64)


def pairwise_game(w: np.ndarray, c: np.ndarray):
    """v(S) = Σ_{i∈S} w_i + Σ_{i<j ∈ S} c_ij: Shapley w_i + Σ_j c_ij/2, interaction I_ij = c_ij."""
    def v(m: np.ndarray) -> np.ndarray:
        x = m.astype(np.float64)
        return x @ w + 0.5 * np.einsum("ki,ij,kj->k", x, c, x)
    return v


def majority_game(weights: np.ndarray, quota: float):
    """Weighted majority: v(S) = 1 if Σ_{i∈S} weights_i ≥ quota."""
    return lambda m: (m.astype(np.float64) @ weights >= quota).astype(np.float64)


def random_pairwise(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=n)
    c = np.triu(rng.normal(size=(n, n)), 1)
    return w, c + c.T


def noisy_game(n: int, seed: int):
    """A non-polynomial game (so Monte Carlo has real variance): pairwise + a smooth saturating term."""
    w, c = random_pairwise(n, seed)
    base = pairwise_game(w, 0.3 * c)
    rng = np.random.default_rng(seed + 1000)
    u = rng.normal(size=n)
    return lambda m: base(m) + 3.0 * np.tanh(m.astype(np.float64) @ u / 2.0) + 2.0 * (m.sum(1) >= n // 2)


# ---------------------------------------------------------------- brute force (independent of the estimators)


def brute_semivalue(v, n: int, weight_of_size) -> np.ndarray:
    """phi_i = Σ_{S ⊆ N∖i} weight_of_size(|S|) [v(S∪i) − v(S)], one subset at a time."""
    phi = np.zeros(n)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        for s in range(n):
            for subset in itertools.combinations(others, s):
                m = np.zeros((2, n), bool)
                m[:, list(subset)] = True
                m[0, i] = True
                val = v(m)
                phi[i] += weight_of_size(s) * (val[0] - val[1])
    return phi


def brute_shapley(v, n: int) -> np.ndarray:
    return brute_semivalue(v, n, lambda s: math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n))


def brute_range(v, n: int, a: int, b: int) -> np.ndarray:
    """Average of marginal contributions over removed counts r = n − |S| ∈ [a, b], then over S of that size."""
    phi = np.zeros(n)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        per_r = []
        for r in range(a, b + 1):
            deltas = []
            for subset in itertools.combinations(others, n - r):
                m = np.zeros((2, n), bool)
                m[:, list(subset)] = True
                m[0, i] = True
                val = v(m)
                deltas.append(val[0] - val[1])
            per_r.append(np.mean(deltas))
        phi[i] = np.mean(per_r)
    return phi


def brute_interactions(v, n: int) -> np.ndarray:
    out = np.zeros((n, n))
    for i, j in itertools.combinations(range(n), 2):
        others = [k for k in range(n) if k not in (i, j)]
        total = 0.0
        for s in range(n - 1):
            weight = math.factorial(s) * math.factorial(n - s - 2) / math.factorial(n - 1)
            for subset in itertools.combinations(others, s):
                m = np.zeros((4, n), bool)
                m[:, list(subset)] = True
                m[0, [i, j]] = True
                m[1, i] = True
                m[2, j] = True
                val = v(m)
                total += weight * (val[0] - val[1] - val[2] + val[3])
        out[i, j] = out[j, i] = total
    return out


# ---------------------------------------------------------------- exact enumeration


def test_exact_additive_game_every_index():
    w = np.array([0.5, -1.25, 2.0, 0.0, 3.5, -0.75])
    for index in (Index("shapley"), Index("banzhaf"), Index("semivalue", 2, 4)):
        s = exact_semivalue(additive_game(w), 6, index, progress=False)
        np.testing.assert_allclose(s.values, w, atol=1e-9)
        assert s.method == "exact" and s.n_evals == 64 and np.all(s.stderr == 0)


@pytest.mark.parametrize("team", [[0], [1, 3], [0, 2, 4, 5], [0, 1, 2, 3, 4, 5, 6]])
def test_exact_unanimity_games(team):
    n = 7
    v = unanimity_game(n, team, scale=2.5)
    expected = np.zeros(n)
    expected[team] = 2.5 / len(team)
    np.testing.assert_allclose(exact_semivalue(v, n, progress=False).values, expected, atol=1e-9)
    expected_banzhaf = np.zeros(n)
    expected_banzhaf[team] = 2.5 / 2 ** (len(team) - 1)
    np.testing.assert_allclose(exact_semivalue(v, n, Index("banzhaf"), progress=False).values,
                               expected_banzhaf, atol=1e-9)


def test_exact_pairwise_game_closed_form_every_index():
    n = 8
    w, c = random_pairwise(n, 3)
    v = pairwise_game(w, c)
    closed = w + c.sum(axis=1) / 2
    np.testing.assert_allclose(exact_semivalue(v, n, progress=False).values, closed, atol=1e-9)
    np.testing.assert_allclose(exact_semivalue(v, n, Index("banzhaf"), progress=False).values, closed, atol=1e-9)
    # range semivalue: E over S of size s of Σ_{j∈S} c_ij = s/(n−1)·Σ_j c_ij, averaged over s = n−r, r ∈ [a, b]
    a, b = 2, 5
    mean_s = np.mean([n - r for r in range(a, b + 1)])
    expected = w + mean_s / (n - 1) * c.sum(axis=1)
    np.testing.assert_allclose(exact_semivalue(v, n, Index("semivalue", a, b), progress=False).values,
                               expected, atol=1e-9)


def test_exact_weighted_majority_matches_brute_force():
    n = 7
    weights = np.array([4.0, 3.0, 3.0, 2.0, 1.0, 1.0, 0.0])
    v = majority_game(weights, quota=7.0)
    s = exact_semivalue(v, n, progress=False)
    np.testing.assert_allclose(s.values, brute_shapley(v, n), atol=1e-9)
    assert abs(s.values[1] - s.values[2]) < 1e-12 and abs(s.values[4] - s.values[5]) < 1e-12  # symmetry
    assert abs(s.values[6]) < 1e-12  # weight-0 player is a dummy
    assert abs(s.values.sum() - 1.0) < 1e-12  # efficiency: v(full) − v(empty) = 1


def test_axioms_on_a_non_polynomial_game():
    n = 9
    base = noisy_game(8, 5)

    def v(m):  # player 8 is a dummy; players 2 and 3 are interchangeable (the game depends on them via a sum)
        m2 = m[:, :8].copy()
        both = m[:, 2].astype(int) + m[:, 3].astype(int)
        m2[:, 2] = both >= 1
        m2[:, 3] = both >= 2
        return base(m2)

    for index in (Index("shapley"), Index("banzhaf"), Index("semivalue", 1, 4)):
        s = exact_semivalue(v, n, index, progress=False)
        assert abs(s.values[8]) < 1e-12, index.name
        assert abs(s.values[2] - s.values[3]) < 1e-12, index.name
    s = exact_semivalue(v, n, progress=False)
    full, empty = v(np.ones((1, n), bool))[0], v(np.zeros((1, n), bool))[0]
    assert abs(s.values.sum() - (full - empty)) < 1e-9
    eff = s.extra["efficiency"]
    assert eff["applies"] and eff["ok"] and eff["rel_error"] < 1e-12
    assert abs(eff["v_full_minus_v_empty"] - (full - empty)) < 1e-12


def test_range_semivalue_matches_brute_force_and_all_sizes_equals_shapley():
    n = 7
    v = noisy_game(n, 11)
    for a, b in [(1, 3), (2, 2), (3, 7), (1, 7)]:
        got = exact_semivalue(v, n, Index("semivalue", a, b), progress=False).values
        np.testing.assert_allclose(got, brute_range(v, n, a, b), atol=1e-9)
    shap = exact_semivalue(v, n, progress=False).values
    np.testing.assert_allclose(exact_semivalue(v, n, Index("semivalue", 1, n), progress=False).values,
                               shap, atol=1e-12)
    np.testing.assert_allclose(shap, brute_shapley(v, n), atol=1e-9)


def test_batched_enumeration_equals_one_batch():
    n = 10
    v = noisy_game(n, 2)
    one = exact_semivalue(v, n, batch_size=1 << n, interactions=True, progress=False)
    for batch in (1, 37, 256):
        many = exact_semivalue(v, n, batch_size=batch, interactions=True, progress=False)
        np.testing.assert_allclose(many.values, one.values, atol=1e-12)
        np.testing.assert_allclose(many.extra["interactions"], one.extra["interactions"], atol=1e-12)


def test_batches_only_ever_see_a_slice_of_the_masks():
    n = 12
    sizes = []

    def v(m):
        sizes.append(m.shape[0])
        return m.sum(1).astype(float)

    exact_semivalue(v, n, batch_size=500, progress=False)  # rounded down to a power of two
    assert max(sizes) == 256 and sum(sizes) == 2**n


def test_interactions_brute_force_and_closed_form():
    n = 6
    w, c = random_pairwise(n, 8)
    np.testing.assert_allclose(exact_interactions(pairwise_game(w, c), n, batch_size=13, progress=False), c,
                               atol=1e-9)
    v = noisy_game(n, 4)
    np.testing.assert_allclose(exact_interactions(v, n, progress=False), brute_interactions(v, n), atol=1e-9)
    # unanimity game of a pair: I_01 = 1 (its only synergy), symmetric, zero for outsiders
    inter = exact_interactions(unanimity_game(n, [0, 1]), n, progress=False)
    assert abs(inter[0, 1] - 1.0) < 1e-12 and np.allclose(inter[2:, :], 0, atol=1e-12)


def test_efficiency_violation_raises(monkeypatch):
    # Σ phi = v(full) − v(empty) is an identity of the Shapley weights, so the check guards the arithmetic:
    # simulate a coefficient bug by handing the enumeration Banzhaf weights under the Shapley name.
    from layershap.shapley import semivalues

    monkeypatch.setattr(semivalues.Index, "weights", lambda self, n: semivalues.banzhaf_weights(n))
    with pytest.raises(EfficiencyError, match="efficiency"):
        exact_semivalue(unanimity_game(6, [0, 1, 2]), 6, progress=False)
    s = exact_semivalue(unanimity_game(6, [0, 1, 2]), 6, progress=False, check_efficiency=False)
    assert s.extra["efficiency"]["ok"] is False


def test_exact_refuses_too_many_layers_and_bad_value_functions():
    with pytest.raises(LayershapError, match="--method mc"):
        exact_semivalue(lambda m: np.zeros(len(m)), 25)
    with pytest.raises(ValueError, match="one number per mask"):
        exact_semivalue(lambda m: np.zeros((len(m), 2)), 3, progress=False)
    with pytest.raises(FloatingPointError):
        exact_semivalue(lambda m: np.full(len(m), np.nan), 3, progress=False)


# ---------------------------------------------------------------- Monte Carlo


def _within_4_se(est, truth):
    return np.all(np.abs(est.values - truth) <= 4 * est.stderr + 1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_permutation_within_4_standard_errors(seed):
    n = 12
    v = noisy_game(n, seed)
    truth = exact_semivalue(v, n, progress=False).values
    est = permutation_shapley(v, n, budget=4000, seed=seed, progress=False)
    assert est.method == "mc-permutation" and est.n_evals <= 4000
    assert np.all(est.stderr > 0)
    assert _within_4_se(est, truth), (est.values - truth) / est.stderr
    assert abs(est.values.sum() - est.extra["efficiency"]["v_full_minus_v_empty"]) < 1e-9  # exact per permutation


@pytest.mark.parametrize("index", [Index("shapley"), Index("banzhaf"), Index("semivalue", 2, 6)])
def test_stratified_within_4_standard_errors(index):
    n = 12
    v = noisy_game(n, 7)
    truth = exact_semivalue(v, n, index, progress=False).values
    est = stratified_semivalue(v, n, 20_000, index, seed=3, progress=False)
    assert est.method == "mc-stratified" and est.index == index.name and est.n_evals <= 20_000
    assert np.all(est.stderr > 0)
    assert _within_4_se(est, truth), (est.values - truth) / est.stderr


def _rms(est, truth):
    return float(np.sqrt(np.mean((est.values - truth) ** 2)))


def test_monte_carlo_error_shrinks_with_budget():
    n = 12
    v = noisy_game(n, 9)
    truth = exact_semivalue(v, n, progress=False).values
    truth_range = exact_semivalue(v, n, Index("semivalue", 1, 5), progress=False).values
    for estimator, t in [
        (lambda b, s: permutation_shapley(v, n, b, seed=s, progress=False), truth),
        (lambda b, s: stratified_semivalue(v, n, b, Index("shapley"), seed=s, progress=False), truth),
        (lambda b, s: stratified_semivalue(v, n, b, Index("semivalue", 1, 5), seed=s, progress=False), truth_range),
    ]:
        small = np.mean([_rms(estimator(3_000, s), t) for s in range(5)])
        large = np.mean([_rms(estimator(12_000, s), t) for s in range(5)])
        assert large < 0.75 * small, (small, large)  # 4x budget -> about half the error


def test_standard_errors_match_observed_spread():
    n = 10
    v = noisy_game(n, 12)
    truth = exact_semivalue(v, n, progress=False).values
    z = []
    for s in range(20):
        est = permutation_shapley(v, n, 1_000, seed=s, progress=False)
        z.append((est.values - truth) / est.stderr)
    spread = np.std(np.concatenate(z))
    assert 0.7 < spread < 1.4  # z-scores have unit spread when the standard errors are right


def test_monte_carlo_seeded_and_exact_on_additive_games():
    n = 30
    w = np.linspace(-1, 2, n)
    v = additive_game(w)
    a = permutation_shapley(v, n, 10_000, seed=5, progress=False)
    np.testing.assert_allclose(a.values, w, atol=1e-9)  # every marginal contribution is w_i exactly
    b = stratified_semivalue(v, n, 10_000, Index("semivalue", 3, 9), seed=5, progress=False)
    np.testing.assert_allclose(b.values, w, atol=1e-9)
    g = noisy_game(n, 1)
    for fn in (lambda s: permutation_shapley(g, n, 5_000, seed=s, progress=False),
               lambda s: stratified_semivalue(g, n, 5_000, seed=s, progress=False)):
        x, y, z = fn(4), fn(4), fn(5)
        assert np.array_equal(x.values, y.values) and np.array_equal(x.stderr, y.stderr)
        assert not np.array_equal(x.values, z.values)


def test_stratified_with_every_stratum_enumerated_is_exact():
    n = 6
    v = noisy_game(n, 6)
    for index in (Index("shapley"), Index("banzhaf"), Index("semivalue", 2, 5)):
        est = stratified_semivalue(v, n, 10_000, index, seed=0, progress=False)
        assert len(est.extra["exhaustive_sizes"]) == int((index.weights(n) > 0).sum())
        np.testing.assert_allclose(est.values, exact_semivalue(v, n, index, progress=False).values, atol=1e-12)
        assert np.all(est.stderr == 0)


def test_monte_carlo_does_not_depend_on_batch_size():
    # small batches split strata (exhaustively enumerated ones included) across value-function calls
    n = 9
    v = noisy_game(n, 3)
    for index in (Index("shapley"), Index("semivalue", 2, 6), Index("banzhaf")):
        a = stratified_semivalue(v, n, 3000, index, seed=2, progress=False)
        b = stratified_semivalue(v, n, 3000, index, seed=2, batch_size=50, progress=False)
        assert a.extra["exhaustive_sizes"]  # the test exercises enumerated strata
        np.testing.assert_allclose(b.values, a.values, atol=1e-12)
        np.testing.assert_allclose(b.stderr, a.stderr, atol=1e-12)
    a = permutation_shapley(v, n, 3000, seed=2, progress=False)
    b = permutation_shapley(v, n, 3000, seed=2, batch_size=40, progress=False)
    np.testing.assert_allclose(b.values, a.values, atol=1e-12)


def test_monte_carlo_budget_errors():
    v = additive_game(np.ones(20))
    with pytest.raises(LayershapError, match="--mc-evals"):
        permutation_shapley(v, 20, budget=50)
    with pytest.raises(LayershapError, match="--mc-evals"):
        stratified_semivalue(v, 20, 100, Index("shapley"))


# ---------------------------------------------------------------- index, coverage and dispatch


def test_index_checks_and_coverage():
    with pytest.raises(LayershapError):
        Index("owen")
    with pytest.raises(LayershapError, match="1 <= A <= B"):
        Index("semivalue", 3, 30).validate(18)
    assert default_index(range(19), 18) == Index("shapley")
    assert default_index([0, 1, 2, 3, 4, 5, 6, 9], 18) == Index("semivalue", 1, 6)
    with pytest.raises(LayershapError):
        default_index([0, 3, 4], 18)
    assert uncovered_counts(Index("shapley"), [0, 1, 2, 3], 5) == [4, 5]
    assert uncovered_counts(Index("semivalue", 2, 3), [1, 2, 3], 5) == []
    assert uncovered_counts(Index("semivalue", 1, 3), [1, 2, 3], 5) == [0]


def test_resolve_method_and_compute_scores():
    assert resolve_method("auto", 22, Index("shapley")) == "exact"
    assert resolve_method("auto", 23, Index("shapley")) == "mc-permutation"
    assert resolve_method("mc", 30, Index("semivalue", 1, 5)) == "mc-stratified"
    with pytest.raises(LayershapError):
        resolve_method("mc-permutation", 30, Index("banzhaf"))
    n = 8
    w, c = random_pairwise(n, 2)
    v = pairwise_game(w, c)
    s = compute_scores(v, n, method="mc", budget=5_000, interactions=True, progress=False)
    np.testing.assert_allclose(s.extra["interactions"], c, atol=1e-9)
    assert s.n_evals > 2**n
    np.testing.assert_array_equal(s.ranking(), np.argsort(s.values))
    assert sorted(s.prune_rank()) == list(range(1, n + 1))


# ---------------------------------------------------------------- the real oracle


def test_exact_shapley_on_tiny_model_oracle_equals_brute_force():
    import torch
    from conftest import make_tiny_model

    from layershap.oracle.evaluate import MaskedEvaluator

    n = 4
    model = make_tiny_model("llama", n_layers=n, seed=1)
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(3, 300, (2, 12), generator=g)
    evaluator = MaskedEvaluator(model, windows, batch_size=2)

    values = {}
    for code in range(2**n):  # every mask, one call each
        mask = np.array([(code >> j) & 1 for j in range(n)], bool)
        values[tuple(mask)] = float(-evaluator.nll(mask[None])[0])
    brute = np.zeros(n)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        for s in range(n):
            weight = math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n)
            for subset in itertools.combinations(others, s):
                without = np.zeros(n, bool)
                without[list(subset)] = True
                with_i = without.copy()
                with_i[i] = True
                brute[i] += weight * (values[tuple(with_i)] - values[tuple(without)])
    got = exact_semivalue(evaluator, n, batch_size=5, progress=False)
    np.testing.assert_allclose(got.values, brute, atol=1e-9)
    assert np.ptp(brute) > 1e-3  # the layers really differ
    eff = got.extra["efficiency"]
    assert abs(eff["v_full"] - values[(True,) * n]) < 1e-12 and abs(eff["v_empty"] - values[(False,) * n]) < 1e-12
