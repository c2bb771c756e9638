"""A surrogate of the KL utility: learned from a kl store's loss column on log(kl + floor), predicts a
divergence (0 for the full model, never negative), records its utility, and its Shapley values rank the layers
of a known additive game as the game does."""

from __future__ import annotations

import json

import numpy as np
import pytest

from layershap.core.errors import LayershapError
from layershap.oracle.measurement import KL_FLOOR
from layershap.oracle.store import DatasetStore
from layershap.oracle.text import windows_sha256
from layershap.sampling.stratified import stratified_masks
from layershap.serve.queries import predict_document
from layershap.shapley.exact import exact_semivalue
from layershap.surrogate.checkpoint import load_surrogate
from layershap.surrogate.data import MaskDataModule
from layershap.surrogate.train import train_surrogate

N = 8
DAMAGE = np.array([0.30, 0.02, 0.15, 0.04, 0.60, 0.01, 0.08, 0.25])  # nats of KL per removed layer


def kl_game(masks: np.ndarray) -> np.ndarray:
    """KL = sum of the removed layers' damages (0 for the full model)."""
    return (~masks).astype(np.float64) @ DAMAGE


def kl_store(path, masks: np.ndarray) -> DatasetStore:
    windows = np.arange(2 * 9, dtype=np.int64).reshape(2, 9)
    identity = {"model_id": "tiny/synthetic", "model_hash": "h", "n_layers": N,
                "layer_types": ["full_attention"] * N, "text_id": "builtin", "windows_sha256": windows_sha256(windows),
                "n_windows": 2, "seq_len": 8, "dtype": "float32", "utility": "kl"}
    store = DatasetStore.create_or_open(path, identity, windows)
    kl = kl_game(masks)
    store.append(masks, 3.0 + 2.0 * kl, np.full(len(masks), 0.01), kl=kl)  # the nll column is not the loss
    return store


@pytest.fixture(scope="module")
def kl_surrogate(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kl")
    store = kl_store(tmp / "data.zarr", stratified_masks(N, 160, seed=0))
    sur = train_surrogate(store, tmp / "sur", members=2, seed=0, hidden=64, max_epochs=300, patience=30, lr=5e-3,
                          progress=False)
    return tmp / "sur", sur


def test_data_module_learns_the_stores_utility(tmp_path):
    masks = stratified_masks(N, 40, seed=1)
    store = kl_store(tmp_path / "d.zarr", masks)
    dm = MaskDataModule.from_store(store, seed=0)
    order = np.argsort([m.tobytes() for m in masks])  # any order: compare as sets of (mask, value) rows
    assert dm.utility == "kl" and dm.offset == KL_FLOOR
    got = {m.tobytes(): v for m, v in zip(dm.masks, dm.nll)}
    assert all(got[m.tobytes()] == pytest.approx(v) for m, v in zip(masks[order], kl_game(masks)[order]))
    expected = np.log(kl_game(masks) + KL_FLOOR)
    assert dm.target_mean == pytest.approx(expected.mean()) and dm.target_std == pytest.approx(expected.std())
    with pytest.raises(LayershapError, match="kl values must be >= 0"):
        MaskDataModule(masks, kl_game(masks) - 0.5, utility="kl")
    with pytest.raises(LayershapError, match="nll values must be positive"):
        MaskDataModule(masks, kl_game(masks), utility="nll")  # the full model's 0 is no nll
    with pytest.raises(LayershapError, match="unknown utility"):
        MaskDataModule(masks, kl_game(masks) + 1, utility="accuracy")


def test_kl_surrogate_predicts_divergences_and_says_so(kl_surrogate):
    folder, _ = kl_surrogate
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["utility"] == "kl" and meta["target"] == "log_kl"
    loaded = load_surrogate(folder)
    assert loaded.utility == "kl" and loaded.offset == KL_FLOOR
    full = np.ones((1, N), bool)
    assert loaded.predict_nll(full)[0] == pytest.approx(0.0, abs=1e-4)  # the anchored full model
    masks = stratified_masks(N, 60, seed=5)
    pred = loaded.predict_nll(masks)
    assert (pred > -1e-6).all()
    true = kl_game(masks)
    assert np.corrcoef(pred, true)[0, 1] > 0.9
    doc = predict_document(loaded, full)
    assert doc["utility"] == "kl" and "perplexity" not in doc and doc["loss"][0] == pytest.approx(0.0, abs=1e-4)
    # the validation plot and file were written in the same atomic save
    assert (folder / "validation.npz").is_file() and (folder / "fit.png").is_file()


def test_shapley_values_of_a_kl_surrogate_rank_the_game(kl_surrogate):
    """Additive game: each layer's Shapley value of -kl is its damage (what keeping it saves); the surrogate's
    ranking agrees on the layers whose damages differ clearly (the three most and the three least important),
    and efficiency holds: the values sum to v(all kept) - v(none kept) = kl(every layer removed)."""
    _, sur = kl_surrogate
    scores = exact_semivalue(sur, N, progress=False)
    order = np.argsort(-scores.values)  # most important first
    truth = np.argsort(-DAMAGE)
    assert set(order[:3]) == set(truth[:3]) and set(order[-3:]) == set(truth[-3:])
    assert scores.values.sum() == pytest.approx(float(sur.predict_nll(np.zeros((1, N), bool))[0]), rel=1e-6)
