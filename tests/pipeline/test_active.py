"""Active sampling on a synthetic oracle: never re-queries a stored mask, stops on its criterion or budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau

from layershap.core.errors import LayershapError
from layershap.core.masks import masks_from_ints
from layershap.oracle.measurement import Measurement
from layershap.oracle.store import DatasetStore
from layershap.oracle.text import windows_sha256
from layershap.pipeline import active
from layershap.pipeline.active import member_disagreement, run_active_sampling, stable
from layershap.sampling.active import select_uncertain
from layershap.sampling.stratified import loo_masks, stratified_masks
from layershap.shapley.estimate import compute_scores
from layershap.shapley.semivalues import Index
from layershap.surrogate.checkpoint import Surrogate
from layershap.surrogate.network import MaskNet

N = 8
FAST_TRAIN = {"max_epochs": 120, "patience": 15, "depth": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


class SyntheticOracle:
    """nll = 2 + sum_i a_i r_i + sum_{i<j} b_ij r_i r_j (r = removed); asserts it is never asked a stored mask."""

    def __init__(self, store: DatasetStore, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.n_layers = N
        self.a = np.linspace(0.05, 1.2, N)[rng.permutation(N)]
        self.b = np.triu(rng.uniform(0.0, 0.08, (N, N)), 1)
        self.store = store
        self.asked: list[bytes] = []

    def true_nll(self, masks: np.ndarray) -> np.ndarray:
        r = (~np.asarray(masks, bool)).astype(float)
        return 2.0 + r @ self.a + np.einsum("ki,ij,kj->k", r, self.b, r)

    def measure(self, masks: np.ndarray) -> Measurement:
        masks = np.asarray(masks, bool).reshape(-1, N)
        assert self.store.missing(masks).all(), "asked for a mask that is already stored"
        self.asked += [row.tobytes() for row in masks]
        return Measurement(np.repeat(self.true_nll(masks)[:, None], 2, axis=1))  # noise-free: windows agree


def _store(tmp_path) -> DatasetStore:
    windows = np.arange(18, dtype=np.int64).reshape(2, 9)
    identity = {
        "model_id": "synthetic", "model_hash": "s" * 64, "n_layers": N, "layer_types": ["full_attention"] * N,
        "text_id": "synthetic", "windows_sha256": windows_sha256(windows), "n_windows": 2, "seq_len": 9,
        "dtype": "float32",
    }
    return DatasetStore.create_or_open(tmp_path / "d.zarr", identity, windows)


def test_stops_when_ranking_is_stable_and_never_requeries(tmp_path):
    store = _store(tmp_path)
    oracle = SyntheticOracle(store)
    pre = loo_masks(N)[:5]  # rows measured before active sampling starts; the initial set overlaps them
    store.append(pre, oracle.true_nll(pre), np.zeros(len(pre)))
    report = run_active_sampling(oracle, store, budget=150, initial=36, batch=12, seed=0, members=3, hidden=32,
                                 tau=0.9, top_k=3, stable_rounds=2, out_dir=tmp_path / "active",
                                 train_options=FAST_TRAIN, progress=False)
    assert len(oracle.asked) == len(set(oracle.asked)) == report["oracle_passes"]  # each mask asked once
    assert not set(oracle.asked) & {row.tobytes() for row in pre}
    assert report["rows"] == len(store) == len(pre) + report["oracle_passes"]
    assert report["stopped"] == "stable" and report["rows"] < 150
    last = report["rounds"][-2:]
    assert all(r["tau"] >= 0.9 and r["same_top_k"] for r in last)
    assert len(report["rounds"]) >= 3
    # Masks added after the initial set lie in the pruning range of the store (1..4 removed for n = 8).
    added = store.masks[36:]  # 5 pre-stored rows + 31 new of the initial 36 come first
    assert set((~added).sum(axis=1).tolist()) <= set(range(1, 5))
    # The surrogate's ranking matches the true game's semivalue ranking (exact, on the synthetic oracle).
    index = Index("semivalue", 1, 4)
    truth = compute_scores(lambda m: -oracle.true_nll(m), N, index, method="exact", progress=False)
    assert report["index"] == truth.index
    assert kendalltau(truth.values, report["scores"]).statistic >= 0.85
    assert set(report["ranking"][:3]) == set(truth.ranking()[:3].tolist())


def test_stops_at_budget(tmp_path):
    store = _store(tmp_path)
    oracle = SyntheticOracle(store, seed=1)
    report = run_active_sampling(oracle, store, budget=40, initial=30, batch=8, seed=3, members=2, hidden=16, stable_rounds=5,
                                 out_dir=tmp_path / "a", train_options=FAST_TRAIN, progress=False)
    assert report["stopped"] == "budget"
    assert report["oracle_passes"] == 40 == len(store) == len(set(oracle.asked))
    assert [r["added"] for r in report["rounds"]] == [8, 2, 0]  # the last round is cut to the budget


def test_rejects_bad_settings(tmp_path):
    store = _store(tmp_path)
    with pytest.raises(LayershapError, match="members >= 2"):
        run_active_sampling(SyntheticOracle(store), store, budget=10, members=1, progress=False)
    with pytest.raises(LayershapError, match="store is empty"):
        run_active_sampling(SyntheticOracle(store), store, budget=10, progress=False)


def test_select_uncertain_takes_top_spread_per_stratum():
    masks = np.ones((9, 6), bool)
    for i in range(9):
        masks[i, : 1 + i % 3] = False  # removed counts 1, 2, 3 repeating
    spread = np.array([0.1, 5.0, 0.2, 0.9, 4.0, 0.3, 0.5, 3.0, 0.25])
    chosen = select_uncertain(masks, spread, 3)
    # one per stratum: the highest spread with 1, 2 and 3 removed layers
    assert sorted(chosen.tolist()) == [1, 3, 5]
    assert sorted(select_uncertain(masks, spread, 5).tolist()) == [1, 3, 4, 5, 6]
    assert len(select_uncertain(masks, spread, 50)) == 9


def test_select_uncertain_takes_one_pick_per_level_band():
    masks = ~np.eye(6, dtype=bool)  # six masks with one layer removed: one stratum
    spread = np.array([1.0, 5.0, 0.0, 9.0, 8.0, 2.0])
    level = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])  # bands by level: rows {5, 4, 3} and {2, 1, 0}
    assert select_uncertain(masks, spread, 2).tolist() == [3, 4]  # no level: the two largest spreads
    assert select_uncertain(masks, spread, 2, level=level).tolist() == [1, 3]  # the largest of each band
    assert select_uncertain(masks, spread, 3, level=level).tolist() == [1, 3, 4]  # bands {5,4} {3,2} {1,0}
    assert select_uncertain(masks, spread, 2, level=np.zeros(6)).tolist() == [3, 4]  # one level: by spread


def test_stability_rule():
    base = [{"tau": None, "same_top_k": False}]
    ok = {"tau": 0.97, "same_top_k": True}
    assert not stable(base + [ok], 0.95, 5, 2)
    assert stable(base + [ok, ok], 0.95, 5, 2)
    assert not stable(base + [ok, {"tau": 0.97, "same_top_k": False}], 0.95, 5, 2)
    assert not stable(base + [ok, {"tau": 0.90, "same_top_k": True}], 0.95, 5, 2)
    assert not stable(base + [ok, {**ok, "validated": False}], 0.95, 5, 2)  # scores on unvalidated counts


def _linear_member(log_nll_of_removed: np.ndarray, base: float) -> MaskNet:
    """A member whose log(nll) is ``base + removed @ log_nll_of_removed`` (MLP path zeroed, linear skip set)."""
    net = MaskNet(N, hidden=4, depth=1)
    with torch.no_grad():
        for p in net.mlp.parameters():
            p.zero_()
        # removed r_i = (1 - x_i) / 2 for inputs x in {-1, +1}
        net.skip.weight.copy_(torch.as_tensor(-log_nll_of_removed / 2, dtype=torch.float32)[None])
        net.skip.bias.fill_(float(base + log_nll_of_removed.sum() / 2))
    return net


def test_picks_are_not_all_catastrophic_masks(tmp_path, monkeypatch):
    """Layer 0 is a cornerstone: removing it multiplies the nll by 10. The two members disagree by 0.2 in
    log-nll on masks that keep it and by 0.05 on masks that remove it, so their spread in nats is larger on the
    catastrophic masks (30 x 0.05 > 3 x 0.2): a rule ranking the spread in nats picks only those; the picks
    must instead cover both kinds of mask about as the pool does."""
    store = _store(tmp_path)
    oracle = SyntheticOracle(store)
    first = stratified_masks(N, 30, seed=0)
    store.append(first, oracle.true_nll(first), np.zeros(len(first)))
    tilt = np.linspace(0.0, 0.01, N)  # breaks ties between masks of one kind
    a = np.full(N, 0.05)
    a[0] = np.log(10.0)
    members = [_linear_member(a, np.log(3.0)), _linear_member(a + tilt - np.eye(N)[0] * 0.15, np.log(3.0) + 0.2)]
    meta = {"n_layers": N, "target": "log_nll", "target_mean": 0.0, "target_std": 1.0,
            "removed_counts": list(range(5)), "model_id": "synthetic"}
    surrogate = Surrogate(members, meta)
    spread, level = member_disagreement(surrogate)(np.array([[True] * N, [False] + [True] * (N - 1)]))
    np.testing.assert_allclose(spread, [0.2 / np.sqrt(2), 0.05 / np.sqrt(2)], rtol=1e-5)
    np.testing.assert_allclose(level, [np.log(3.0) + 0.1, np.log(30.0) + 0.025], rtol=1e-6)
    monkeypatch.setattr(active, "train_surrogate", lambda *args, **kwargs: surrogate)
    report = run_active_sampling(oracle, store, budget=len(store) + 16, batch=16, seed=0, members=2,
                                 out_dir=tmp_path / "a", progress=False)
    picked = store.masks[len(first):]
    assert report["rounds"][0]["added"] == len(picked) == 16
    every = masks_from_ints(np.arange(2**N), N)
    in_range = every[np.isin((~every).sum(axis=1), [1, 2, 3, 4])]
    measured = {m.tobytes() for m in first}
    pool = in_range[[m.tobytes() not in measured for m in in_range]]  # every unmeasured mask is a candidate
    pool_share = float((~pool[:, 0]).mean())
    share = float((~picked[:, 0]).mean())
    assert 0.2 < pool_share < 0.8
    assert abs(share - pool_share) <= 0.2, (share, pool_share)  # ranking the spread in nats gives share 1.0
    assert len(pool) == 133 and report["rounds"][0]["mean_log_spread_chosen"] > 0
