"""measure_masks and the cached oracle with a stand-in evaluator: only missing masks are measured, once each, in
kept-layer trie order."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from layershap.core.errors import MaskError
from layershap.core.masks import unique_rows
from layershap.oracle.measure import CachedOracle, measure_masks
from layershap.oracle.measurement import Measurement
from layershap.oracle.store import DatasetStore
from layershap.oracle.text import windows_sha256

N = 4


class CountingEvaluator:
    """nll = 2 + (number of removed layers) + 0.1 * (index of the first removed layer); records its calls."""

    n_layers = N

    def __init__(self) -> None:
        self.calls: list[np.ndarray] = []

    def measure(self, masks: np.ndarray) -> Measurement:
        masks = np.asarray(masks, bool)
        self.calls.append(masks.copy())
        removed = (~masks).sum(1)
        first = np.where(removed > 0, np.argmin(masks, axis=1), 0)
        per_window = (2.0 + removed + 0.1 * first)[:, None] + np.array([[-0.5, 0.5]])  # two windows, mean as above
        return Measurement(per_window)


def closed_form(masks: np.ndarray) -> np.ndarray:
    return np.array([2.0 + (~m).sum() + 0.1 * (np.flatnonzero(~m)[0] if (~m).any() else 0) for m in masks])


@pytest.fixture
def store(tmp_path):
    windows = np.arange(12, dtype=np.int64).reshape(2, 6)
    identity = {"model_id": "stand-in", "model_hash": "0" * 64, "n_layers": N, "layer_types": ["full_attention"] * N,
                "text_id": "t", "windows_sha256": windows_sha256(windows), "n_windows": 2, "seq_len": 5,
                "dtype": "float32"}
    return DatasetStore.create_or_open(tmp_path / "s.zarr", identity, windows)


def all_masks() -> np.ndarray:
    return ((np.arange(2**N)[:, None] >> np.arange(N)) & 1).astype(bool)


def test_measures_missing_masks_once_in_order(store):
    masks = all_masks()
    ev = CountingEvaluator()
    store.append(masks[[5, 9]], closed_form(masks[[5, 9]]), [1.0, 1.0])
    request = np.vstack([masks, masks[:4]])  # 16 masks + 4 repeats, 2 already stored
    assert measure_masks(ev, store, request, progress=False, masks_per_call=3) == 14
    measured = np.vstack(ev.calls)
    missing = np.delete(masks, [5, 9], axis=0)
    assert sorted(row.tobytes() for row in measured) == sorted(row.tobytes() for row in missing)  # each once
    kept = [list(np.flatnonzero(row)) for row in measured]
    assert all(a < b for a, b in itertools.pairwise(kept))  # depth-first trie order: kept-layer lists ascending
    assert [len(c) for c in ev.calls] == [3, 3, 3, 3, 2]
    assert len(store) == 16
    np.testing.assert_allclose(store.nll, closed_form(store.masks))
    assert (store.seconds[2:] >= 0).all()
    assert measure_masks(ev, store, request, progress=False) == 0 and len(ev.calls) == 5  # nothing left


def test_mask_length_and_layer_count_checked(store):
    with pytest.raises(MaskError, match="does not match"):
        measure_masks(CountingEvaluator(), store, np.ones((2, N + 1), bool), progress=False)

    class Wider(CountingEvaluator):
        n_layers = N + 2

    with pytest.raises(MaskError, match="6 decoder layers but the store"):
        measure_masks(Wider(), store, np.ones((1, N), bool), progress=False)
    assert len(store) == 0


def test_unique_rows_keeps_first_occurrences():
    m = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1], [1, 1, 1]], bool)
    np.testing.assert_array_equal(unique_rows(m), m[[0, 1, 4]])


def test_cached_oracle_with_a_store_measures_each_mask_once_and_appends(store):
    masks = all_masks()
    ev = CountingEvaluator()
    store.append(masks[[3]], closed_form(masks[[3]]), [1.0])
    oracle = CachedOracle(ev, store, progress=False)
    np.testing.assert_allclose(oracle(masks[[3, 6, 6, 7]]), -closed_form(masks[[3, 6, 6, 7]]))
    assert oracle.measured == 2 and len(store) == 3  # 3 was stored; 6 measured once although asked twice
    measure_masks(ev, store, masks[[8]], progress=False)  # a row appended by someone else is an answer too
    calls = len(ev.calls)
    np.testing.assert_allclose(oracle.loss(masks[[8, 7, 3]]), closed_form(masks[[8, 7, 3]]))
    assert len(ev.calls) == calls and oracle.measured == 2
    assert oracle.known(masks[6]) == pytest.approx(closed_form(masks[[6]])[0]) and oracle.known(masks[9]) is None
    np.testing.assert_allclose(store.nll, closed_form(store.masks))


def test_cached_oracle_without_a_store_keeps_answers_in_memory():
    ev = CountingEvaluator()
    oracle = CachedOracle(ev, label="held-out", progress=False)
    masks = all_masks()
    np.testing.assert_allclose(oracle.loss(masks), closed_form(masks))
    np.testing.assert_allclose(oracle.loss(masks[::-1]), closed_form(masks[::-1]))
    assert oracle.measured == 2**N and sum(len(c) for c in ev.calls) == 2**N
    with pytest.raises(MaskError, match="does not match"):
        oracle.loss(np.ones((1, N + 1), bool))


def test_per_window_values_reach_the_store_and_the_oracle(store):
    ev = CountingEvaluator()
    oracle = CachedOracle(ev, store, progress=False)
    masks = all_masks()[[3, 5]]
    got = oracle.window_loss(masks)
    np.testing.assert_allclose(got, closed_form(masks)[:, None] + np.array([[-0.5, 0.5]]))
    np.testing.assert_allclose(DatasetStore.open(store.path).window_loss(), got)
    again = CachedOracle(CountingEvaluator(), DatasetStore.open(store.path), progress=False)
    np.testing.assert_allclose(again.window_loss(masks), got)  # answered from the store, not measured


def test_an_evaluator_of_another_utility_cannot_write_a_store(tmp_path):
    windows = np.arange(12, dtype=np.int64).reshape(2, 6)
    identity = {"model_id": "m", "model_hash": "h" * 64, "n_layers": N, "layer_types": ["full_attention"] * N,
                "text_id": "t", "windows_sha256": windows_sha256(windows), "n_windows": 2, "seq_len": 5,
                "dtype": "float32", "utility": "kl"}
    store = DatasetStore.create_or_open(tmp_path / "kl.zarr", identity, windows)
    with pytest.raises(MaskError, match="holds 'kl' rows but the evaluator measures 'nll'"):
        CachedOracle(CountingEvaluator(), store)
    with pytest.raises(MaskError, match="--utility kl"):
        measure_masks(CountingEvaluator(), store, all_masks()[:2], progress=False)
    assert len(DatasetStore.open(store.path)) == 0
