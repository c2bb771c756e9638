"""The race on decision blocks, against hand computations of paired window differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from layershap.core.errors import LayershapError
from layershap.core.masks import masks_from_removed
from layershap.pruning.plan import removal_set
from layershap.pruning.race import drop_threshold, paired_gap, race

N = 6


def block_game(means: dict, noise: float, seed: int, windows: int = 4):
    """Per-window losses: each set's mean plus window difficulty shared by all sets (common random numbers) plus
    its own alternating +-noise (so two sets of equal mean differ by +-2 noise per window, mean 0: a tie the race
    can never resolve); records how often each set was measured."""
    calls: list[tuple[int, ...]] = []
    shared = np.random.default_rng(seed).normal(0, 1.0, windows)  # window difficulty, the same for every set
    signs = np.resize([1.0, -1.0], windows)
    own = {s: noise * signs * (-1 if i == len(means) - 1 else 1) for i, s in enumerate(means)}

    def measure(masks):
        out = []
        for m in masks:
            s = removal_set(m)
            calls.append(s)
            out.append(means[s] + shared + own[s])
        return np.array(out)

    return measure, calls


def test_paired_gap_is_the_mean_and_standard_error_of_the_differences():
    a, b = np.array([3.0, 1.0, 2.5, 4.0]), np.array([2.0, 0.5, 2.4, 3.0])
    d = a - b
    assert paired_gap(a, b) == pytest.approx((d.mean(), d.std(ddof=1) / 2.0))
    assert paired_gap(np.array([1.0, np.nan]), np.array([0.5, 0.2]))[1] == math.inf  # one common window


def test_drop_threshold_is_students_t_at_the_normal_level():
    assert drop_threshold(2.0, 5) == pytest.approx(stats.t.ppf(stats.norm.cdf(2.0), 4))
    assert drop_threshold(2.0, 1) == math.inf


def test_a_clearly_worse_set_drops_after_one_block_and_a_tie_runs_every_block():
    means = {(1,): 1.0, (2,): 3.0, (3,): 1.0}
    blocks = [block_game(means, 0.01, seed)[0] for seed in range(3)]
    calls = []
    for b in range(3):
        measure, c = block_game(means, 0.01, b)
        blocks[b] = measure
        calls.append(c)
    res = race([(1,), (2,), (3,)], blocks, N, block_tokens=1000)
    assert res.dropped[(2,)] == 0 and (2,) not in calls[1]  # out after block 0, never measured again
    assert res.blocks_run == {(1,): 3, (2,): 1, (3,): 3}
    assert res.passes == 3 + 2 + 2 and res.tokens == 7000
    # the winner and its margin, recomputed from the per-window values of the blocks both ran
    joined = {s: np.concatenate([blocks[b](masks_from_removed([s], N))[0] for b in range(3)]) for s in [(1,), (3,)]}
    winner = min(joined, key=lambda s: (joined[s].mean(), s))
    assert res.winner == winner
    other = (3,) if winner == (1,) else (1,)
    gap, se = paired_gap(joined[other], joined[winner])
    assert res.runner_up == other and res.gap == pytest.approx(gap) and res.margin_se == pytest.approx(gap / se)
    assert res.margin_se < drop_threshold(2.0, 12)  # a tie: not separated, and the result says so


def test_one_contender_needs_one_block_and_bad_requests_are_clear():
    measure, calls = block_game({(4,): 2.0}, 0.1, 0)
    res = race([(4,)], [measure, measure], N)
    assert res.winner == (4,) and res.runner_up is None and len(calls) == 1
    with pytest.raises(LayershapError, match="at least one contender"):
        race([], [measure], N)
    with pytest.raises(LayershapError, match="at least one block"):
        race([(4,)], [], N)
