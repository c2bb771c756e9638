"""Plans with the oracle in the loop, on closed-form games whose best removal sets are known by brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from layershap.core.errors import LayershapError
from layershap.core.masks import masks_from_removed
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


def test_lowest_scores_are_wrong_here_and_the_plan_is_right():
    shapley = exact_semivalue(lambda m: -game_nll(m), N, progress=False).values
    lowest2 = tuple(sorted(np.argsort(shapley, kind="stable")[:2].tolist()))
    assert lowest2 != brute_best(2)  # the game is built so that scores mislead at K = 2
    res = find_plans(GameOracle(), [1, 2, 3, 4], budget=45, seed=0, progress=False)
    for k in (1, 2, 3, 4):
        assert res.plans[k].removed == brute_best(k)
        assert res.plans[k].nll == pytest.approx(game_nll(masks_from_removed([brute_best(k)], N))[0])


def test_never_remeasures_a_stored_mask_and_respects_the_budget():
    stored = [()] + [(i,) for i in range(N)] + [(0, 3), (1, 2), (0, 3, 5)]
    oracle = GameOracle(stored)
    res = find_plans(oracle, [2, 3], budget=17, seed=1, progress=False)
    assert len(oracle.measured) == len(set(oracle.measured)) == res.passes <= 17
    assert not set(oracle.measured) & set(stored)
    again = find_plans(oracle, [2, 3], budget=5, seed=1, progress=False)  # a rerun: stored rows are free
    assert again.passes <= 5 and len(oracle.measured) == len(set(oracle.measured))


def test_a_round_cut_short_by_the_budget_serves_every_k():
    """With only 3 passes left for a round and K = 2, 3, 4, each K gets one (its local step), not K = 2 all."""
    full = find_plans(GameOracle(), [2, 3, 4], budget=200, seed=0, progress=False)
    first_round = full.rounds[0]["passes"]
    oracle = GameOracle()
    res = find_plans(oracle, [2, 3, 4], budget=first_round + 3, seed=0, progress=False)
    assert res.passes == first_round + 3 and res.rounds[-1]["measured"] == 3
    assert sorted(len(s) for s in oracle.measured[-3:]) == [2, 3, 4]


def test_validation_chooses_among_the_best_measured_sets():
    # validation windows that disagree with calibration about the best pair: by more than the calibration gap,
    # the plan follows the pooled nll away from it; by less, the clear calibration winner stays
    def make_validation(penalty):
        def validation_nll(masks):
            nll = game_nll(masks)
            return np.where([removal_set(m) == (0, 3) for m in masks], nll + penalty, nll)
        return validation_nll

    for penalty, moved in ((1.0, True), (0.001, False)):
        oracle = GameOracle()
        validation_nll = make_validation(penalty)
        res = find_plans(oracle, [2], budget=40, seed=0, validation=validation_nll, top_validate=3, progress=False)
        top3 = [s for s, _ in sorted(oracle.known.items(), key=lambda kv: kv[1]) if len(s) == 2][:3]
        pooled = {s: oracle.known[s] + validation_nll(masks_from_removed([s], N))[0] for s in top3}
        assert res.validation_passes == 3 and res.plans[2].validation_nll is not None
        assert res.plans[2].removed == min(pooled, key=pooled.get)
        assert (res.plans[2].removed != (0, 3)) == moved


def test_bad_plan_requests_are_clear_errors():
    with pytest.raises(LayershapError, match="1 <= K"):
        find_plans(GameOracle(), [N], budget=10, progress=False)
    with pytest.raises(LayershapError, match="budget"):
        find_plans(GameOracle(), [2], budget=-1, progress=False)
    with pytest.raises(LayershapError, match="raise the budget"):  # nothing stored, nothing may be measured
        find_plans(GameOracle(), [2], budget=0, progress=False)
