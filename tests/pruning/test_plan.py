"""Plans with the oracle in the loop, on closed-form games whose best removal sets are known by brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from layershap.core.errors import LayershapError
from layershap.core.masks import masks_from_removed
from layershap.pruning.budget import INITIAL_PER_K, plan_budget
from layershap.pruning.plan import find_plans, removal_set
from layershap.shapley.exact import exact_semivalue

# Additive costs, one planted pair whose joint removal is cheaper than its parts (B < 0), and a mild quadratic
# growth in the number of removed layers. The Shapley value of layers 5 and 6 is pulled down by half the pair
# term, so "remove the K lowest scores" takes one of them at K=2 ({0, 5}: 0.65 + 0.2), while the best pair is
# {0, 3} (0.37 + 0.2).
N = 10
A = np.array([0.15, 0.9, 1.2, 0.22, 0.8, 0.5, 0.5, 1.5, 0.95, 1.1])
P, Q, B = 5, 6, -0.6
BASE = 3.0


def game_nll(masks: np.ndarray) -> np.ndarray:
    r = (~np.asarray(masks, dtype=bool)).astype(float)
    return BASE + r @ A + B * r[:, P] * r[:, Q] + 0.05 * r.sum(axis=1) ** 2


def brute_best(k: int) -> tuple[int, ...]:
    sets = list(itertools.combinations(range(N), k))
    return sets[int(np.argmin(game_nll(masks_from_removed(sets, N))))]


class GameOracle:
    """Stored rows plus measuring on the closed-form game; records every mask it is asked to measure."""

    n_layers = N

    def __init__(self, stored: list[tuple[int, ...]] = (), game=game_nll) -> None:
        self.game = game
        self.known = {s: float(game(masks_from_removed([s], N))[0]) for s in stored}
        self.measured: list[tuple[int, ...]] = []

    def loss(self, masks: np.ndarray) -> np.ndarray:
        out = []
        for m in np.asarray(masks, dtype=bool):
            s = removal_set(m)
            if s not in self.known:
                self.measured.append(s)
                self.known[s] = float(self.game(m[None])[0])
            out.append(self.known[s])
        return np.array(out)

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        sets = list(self.known)
        return masks_from_removed(sets, N), np.array([self.known[s] for s in sets])


def budget(ks, search=4, **kw):
    return plan_budget(N, ks, search_per_k=search, **kw)


def test_lowest_scores_are_wrong_here_and_the_plan_is_right():
    shapley = exact_semivalue(lambda m: -game_nll(m), N, progress=False).values
    lowest2 = tuple(sorted(np.argsort(shapley, kind="stable")[:2].tolist()))
    assert lowest2 != brute_best(2)  # the game is built so that scores mislead at K = 2
    res = find_plans(GameOracle(), [1, 2, 3, 4], budget([1, 2, 3, 4]), seed=0, progress=False)
    for k in (1, 2, 3, 4):
        assert res.plans[k].removed == brute_best(k)
        assert res.plans[k].loss == pytest.approx(game_nll(masks_from_removed([brute_best(k)], N))[0])


def test_never_remeasures_a_stored_mask_and_respects_each_k_s_share():
    stored = [()] + [(i,) for i in range(N)] + [(0, 3), (1, 2), (0, 3, 5)]
    oracle = GameOracle(stored)
    b = budget([2, 3], search=2)
    res = find_plans(oracle, [2, 3], b, seed=1, progress=False)
    per_k = {k: sum(1 for s in oracle.measured if len(s) == k) for k in (2, 3, 4)}
    assert len(oracle.measured) == len(set(oracle.measured)) == res.passes
    assert all(per_k[k] <= res.spent[k] == INITIAL_PER_K + 2 for k in (2, 3))
    assert per_k[4] <= res.spent[4] == INITIAL_PER_K  # sets of K + 1 for the proposal model: their own share
    assert not set(oracle.measured) & set(stored)
    # a rerun that already spent its shares measures nothing more; a new K gets its own share
    again = find_plans(oracle, [2, 3], b, spent=res.spent, seed=1, progress=False)
    assert again.passes == 0
    more = find_plans(oracle, [2, 3, 4], budget([2, 3, 4], search=2), spent=res.spent, seed=1, progress=False)
    assert more.passes > 0 and all(len(s) >= 4 for s in oracle.measured[len(oracle.measured) - more.passes:])
    assert more.spent[2] == res.spent[2] and more.spent[3] == res.spent[3]


def test_a_round_cut_short_by_the_budget_serves_every_k():
    """With one pass left per K for a round and K = 2, 3, 4, each K gets its local step, not K = 2 all."""
    full = find_plans(GameOracle(), [2, 3, 4], budget([2, 3, 4], search=30), seed=0, progress=False)
    assert len(full.rounds) >= 2
    oracle = GameOracle()
    res = find_plans(oracle, [2, 3, 4], budget([2, 3, 4], search=1), seed=0, progress=False)
    assert res.rounds[0]["measured"] == 3
    assert sorted(len(s) for s in oracle.measured[-3:]) == [2, 3, 4]


def test_the_race_on_decision_blocks_overrules_a_misleading_screen():
    """Screening windows that flatter one pair by more than its true gap: the race on fresh blocks (the true game
    plus window noise) picks the true best pair and says how sure it is; without blocks the screen's pick stands."""
    flattered = (0, 5)

    def screen_game(masks):
        nll = game_nll(masks)
        return np.where([removal_set(m) == flattered for m in masks], nll - 0.5, nll)

    def block(seed):
        rng = np.random.default_rng(seed)

        def window_loss(masks):
            return game_nll(masks)[:, None] + rng.normal(0, 0.01, (len(masks), 4))
        return window_loss

    screened = find_plans(GameOracle(game=screen_game), [2], budget([2]), seed=0, progress=False)
    assert screened.plans[2].removed == flattered and not screened.races
    res = find_plans(GameOracle(game=screen_game), [2], budget([2], candidates=3, max_blocks=3),
                     decide=[block(s) for s in range(3)], seed=0, progress=False)
    assert res.plans[2].removed == brute_best(2) != flattered
    race = res.races[2]
    assert flattered in race.loss and race.margin_se > 3
    assert res.plans[2].decision_loss == pytest.approx(race.loss[brute_best(2)])
    assert res.decision_passes == race.passes <= 3 * 3


def test_an_80_layer_model_plans_within_its_default_budget():
    """Deep models: planted cheap layers among 80 (and a pair whose joint removal is cheaper than its parts, but
    not cheap enough to enter an optimum); the default budget covers leave-one-out and every K up front, sets are
    scored by index (no dense C(80, K) x 3,240 features), and the optimum of every K is found."""
    n = 80
    rng = np.random.default_rng(0)
    a = rng.uniform(0.3, 1.5, n)
    cheap = [11, 23, 42, 57, 70]
    a[cheap] = [0.05, 0.06, 0.07, 0.08, 0.09]
    pair = (30, 31)  # expensive alone, cheap together

    def deep_game(masks):
        r = (~np.asarray(masks, bool)).astype(float)
        return 3.0 + r @ a - 1.1 * r[:, pair[0]] * r[:, pair[1]] + 0.01 * r.sum(1) ** 2

    class Deep(GameOracle):
        n_layers = n

        def rows(self):
            sets = list(self.known)
            return masks_from_removed(sets, n), np.array([self.known[s] for s in sets])

        def loss(self, masks):
            for m in np.asarray(masks, bool):
                self.known.setdefault(removal_set(m), float(deep_game(m[None])[0]))
            return np.array([self.known[removal_set(m)] for m in np.asarray(masks, bool)])

    ks = [1, 2, 3, 4, 5, 8]
    b = plan_budget(n, ks)
    res = find_plans(Deep(), ks, b, seed=0, progress=False)
    assert res.passes <= b.screen_passes
    assert res.plans[1].removed == (11,) and res.plans[2].removed == (11, 23)
    assert set(res.plans[5].removed) == set(cheap)
    # K = 8: the five planted layers and the three next cheapest (the pair, 0.79 together, costs more than two
    # singles of 0.32-0.34), so the optimum is known in closed form
    rest = [int(i) for i in np.argsort(a) if i not in cheap][:3]
    assert a[list(pair)].sum() - 1.1 > a[rest[:2]].sum()
    assert res.plans[8].removed == tuple(sorted(cheap + rest))


def test_bad_plan_requests_are_clear_errors():
    with pytest.raises(LayershapError, match="1 <= K"):
        find_plans(GameOracle(), [N], budget([2]), progress=False)
    with pytest.raises(LayershapError, match="sized for 12 layers"):
        find_plans(GameOracle(), [2], plan_budget(12, [2]), progress=False)
