"""Stratified mask sampling: strata counts, uniqueness, leave-one-out, exclude, seeds, pairs, errors."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from layershap.core.errors import LayershapError
from layershap.sampling.stratified import (
    all_removed_counts,
    default_removed_counts,
    loo_masks,
    stratified_masks,
)


def _removed(masks: np.ndarray) -> np.ndarray:
    return (~masks).sum(axis=1)


def _keys(masks: np.ndarray) -> list[bytes]:
    return [row.tobytes() for row in masks]


def test_loo_masks_closed_form():
    m = loo_masks(5)
    assert m.shape == (6, 5) and m.dtype == bool
    assert m[0].all()
    for i in range(5):
        expected = np.ones(5, bool)
        expected[i] = False
        assert (m[i + 1] == expected).all()


def test_default_and_all_strata():
    assert default_removed_counts(18) == list(range(1, 10))
    assert default_removed_counts(7) == [1, 2, 3, 4]
    assert all_removed_counts(4) == [1, 2, 3, 4]


def test_counts_per_stratum_with_capped_stratum():
    # n = 10, default strata 1..5. The 11 fixed masks fill strata 0 and 1; 189 are left for strata 2..5
    # whose sizes are C(10, r) = 45, 120, 210, 252. Equal share 189/4 > 45, so stratum 2 takes all 45 and
    # the other three share 144 -> 48 each.
    masks = stratified_masks(10, 200, seed=3)
    assert masks.shape == (200, 10) and masks.dtype == bool
    assert dict(Counter(_removed(masks).tolist())) == {0: 1, 1: 10, 2: 45, 3: 48, 4: 48, 5: 48}
    assert (masks[:11] == loo_masks(10)).all()  # full model and leave-one-out come first
    assert len(set(_keys(masks))) == 200


def test_remainder_goes_to_fewest_removed():
    # n = 12, strata 2..6 (1 is full after leave-one-out): 13 fixed + 5 * 40 + 3 -> 41, 41, 41, 40, 40.
    masks = stratified_masks(12, 13 + 203, seed=0, removed=range(1, 7))
    counts = Counter(_removed(masks).tolist())
    assert [counts[r] for r in range(7)] == [1, 12, 41, 41, 41, 40, 40]


def test_without_loo_and_custom_strata():
    masks = stratified_masks(9, 30, seed=1, removed=[2, 7], include_loo=False)
    assert dict(Counter(_removed(masks).tolist())) == {2: 15, 7: 15}
    assert len(set(_keys(masks))) == 30


def test_whole_space_when_asked_for_every_mask():
    n = 6
    masks = stratified_masks(n, 2**n, seed=5, removed=all_removed_counts(n))
    every = {np.array(bits, bool).tobytes() for bits in itertools.product([False, True], repeat=n)}
    assert set(_keys(masks)) == every and len(masks) == 2**n


def test_exclude_respected_and_counts_new_masks_only():
    first = stratified_masks(10, 120, seed=0)
    more = stratified_masks(10, 100, seed=1, exclude=first)
    assert len(more) == 100
    assert not set(_keys(more)) & set(_keys(first))
    assert len(set(_keys(more))) == 100
    # the full model and leave-one-out masks were in `exclude`, so none is returned again
    assert _removed(more).min() >= 2
    # excluding only part of the leave-one-out masks: the others are still included first
    partial = stratified_masks(10, 30, seed=1, exclude=loo_masks(10)[:4])
    assert (partial[:7] == loo_masks(10)[4:]).all()
    assert not set(_keys(partial)) & set(_keys(loo_masks(10)[:4]))


def test_seed_determinism():
    a = stratified_masks(16, 300, seed=42, removed=range(1, 17))
    b = stratified_masks(16, 300, seed=42, removed=range(1, 17))
    c = stratified_masks(16, 300, seed=43, removed=range(1, 17))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_uniform_within_stratum_enumerated_and_rejection():
    # Enumerated stratum (C(16, 3) = 560): each layer removed with probability 3/16.
    m = stratified_masks(16, 500, seed=0, removed=[3], include_loo=False)
    freq = (~m).sum(axis=0)
    sd = np.sqrt(500 * 3 / 16 * 13 / 16)
    assert np.all(np.abs(freq - 500 * 3 / 16) < 5 * sd)
    # Rejection-sampled stratum (C(30, 15) ~ 1.6e8): each layer removed with probability 1/2.
    m = stratified_masks(30, 400, seed=0, removed=[15], include_loo=False)
    assert (_removed(m) == 15).all() and len(set(_keys(m))) == 400
    freq = (~m).sum(axis=0)
    assert np.all(np.abs(freq - 200) < 5 * np.sqrt(400 * 0.25))


def test_impossible_requests_are_clear_errors():
    with pytest.raises(LayershapError, match="only 15 distinct masks"):
        stratified_masks(4, 16, seed=0, removed=[1, 2, 3])
    with pytest.raises(LayershapError, match="at least 11"):
        stratified_masks(10, 5, seed=0)
    with pytest.raises(LayershapError, match="outside 0..6"):
        stratified_masks(6, 20, seed=0, removed=[1, 7])
    with pytest.raises(LayershapError, match="empty"):
        stratified_masks(6, 20, seed=0, removed=[])
    with pytest.raises(LayershapError, match="positive integer"):
        stratified_masks(0, 1, seed=0)
    with pytest.raises(LayershapError, match="non-negative"):
        stratified_masks(6, -1, seed=0)
    # exclude shrinks what is available
    first = stratified_masks(5, 16, seed=0, removed=[1, 2, 3])  # all 1 + 5 + 10 + 10 masks but 10
    with pytest.raises(LayershapError, match="excluded"):
        stratified_masks(5, 11, seed=1, removed=[1, 2, 3], exclude=first)
    assert len(stratified_masks(5, 10, seed=1, removed=[1, 2, 3], exclude=first)) == 10
