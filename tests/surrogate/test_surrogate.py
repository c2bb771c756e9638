"""Surrogate: metrics, split, training on a known smooth game, determinism, ensemble spread, checkpoints,
mask and store checks, and `layershap train` end to end on a small store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import r2_score

from layershap.core.errors import LayershapError, MaskError, StoreMismatchError
from layershap.sampling.stratified import stratified_masks
from layershap.surrogate.checkpoint import PREDICT_CHUNK_BYTES, Surrogate, load_surrogate, predict_chunk
from layershap.surrogate.data import MaskDataModule, folds_for, stratified_folds
from layershap.surrogate.metrics import (
    fit_metrics,
    format_metrics_table,
    not_validated,
    regression_metrics,
    spearman_p,
    stratum_verdict,
)
from layershap.surrogate.model import MaskMLP
from layershap.surrogate.network import MaskNet, encode_masks
from layershap.surrogate.train import member_seeds, train_ensemble

N = 10
FAST = {"hidden": 32, "max_epochs": 40, "patience": 10, "lr": 5e-3, "progress": False}


def smooth_game(masks: np.ndarray) -> np.ndarray:
    """nll = 2 + sum_i w_i (1 - m_i) + sum_{i<j} p_ij (1 - m_i)(1 - m_j), fixed seed."""
    rng = np.random.default_rng(7)
    w = rng.uniform(0.1, 1.0, N)
    p = np.triu(rng.normal(0.0, 0.05, (N, N)), 1)
    r = (~masks).astype(np.float64)
    return 2.0 + r @ w + np.einsum("ki,ij,kj->k", r, p, r)


def game_data_masks() -> np.ndarray:
    return stratified_masks(N, 200, seed=0)


def canonical_masks() -> np.ndarray:
    """The game's masks in the data module's row order: lexicographic over the mask bits (layer 0 first)."""
    masks = game_data_masks()
    keys = ["".join("1" if b else "0" for b in row) for row in masks]
    return masks[sorted(range(len(masks)), key=keys.__getitem__)]


@pytest.fixture(scope="module")
def game_data() -> tuple[np.ndarray, np.ndarray]:
    masks = game_data_masks()
    return masks, smooth_game(masks)


class RecordingDataModule(MaskDataModule):
    """Records, for every network trained, the rows its train and validation loaders serve (the tensors built
    at each ``setup``): what the network fitted on and what its early stopping looked at."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[np.ndarray, np.ndarray]] = []

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.seen.append((self._train.tensors[0].numpy() > 0, self._val.tensors[0].numpy() > 0))


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory, game_data) -> Path:
    out = tmp_path_factory.mktemp("ensemble")
    dm = RecordingDataModule(*game_data, seed=0)
    surrogate = train_ensemble(dm, out, provenance={"model_id": "synthetic", "model_hash": "h0"}, members=3, seed=0,
                               **FAST)
    (out / "returned_metrics.json").write_text(json.dumps(surrogate.metadata["metrics"]))
    np.save(out / "returned_predictions.npy", surrogate.predict(dm.masks))
    np.savez(out / "seen.npz", **{f"{kind}_{k}": rows for k, pair in enumerate(dm.seen)
                                  for kind, rows in zip(("fit", "stop"), pair)})
    return out


def test_returned_surrogate_equals_the_saved_one(ensemble_dir, game_data):
    """The pipeline keeps the trained surrogate in memory: it must predict exactly what the saved one does."""
    loaded = load_surrogate(ensemble_dir)
    masks = MaskDataModule(*game_data, seed=0).masks
    np.testing.assert_array_equal(np.stack(loaded.predict(masks)), np.load(ensemble_dir / "returned_predictions.npy"))


def test_full_model_is_reproduced_exactly_by_the_anchor(ensemble_dir, game_data):
    """The full model is measured (2.0 nats in the game): every member, saved and reloaded, predicts it exactly,
    while the other masks are still a free fit (their predictions differ between members)."""
    masks, nll = game_data
    assert smooth_game(np.ones((1, N), bool))[0] == 2.0
    meta = json.loads((ensemble_dir / "metadata.json").read_text())
    log_nll = np.log(nll)
    assert meta["architecture"]["anchor"] == pytest.approx((np.log(2.0) - log_nll.mean()) / log_nll.std())
    sur = load_surrogate(ensemble_dir)
    full = np.ones((1, N), bool)
    for j in range(sur.members):
        assert sur.member(j).predict_nll(full)[0] == pytest.approx(2.0, rel=1e-5)
    assert sur.predict_std(full)[0] < 1e-5 < sur.predict_std(masks[~masks.all(1)]).min()


def test_loss_weights_near_full_masks_more():
    """The training loss is the mean squared error weighted 1 / (1 + removed layers), computed by hand here."""
    module = MaskMLP(4, hidden=8)
    masks = np.array([[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 0], [0, 0, 0, 0]], bool)
    x, y = encode_masks(masks), torch.tensor([0.5, -1.0, 2.0, 3.0])
    with torch.no_grad():
        err = (module(x) - y).numpy().astype(np.float64) ** 2
        loss = float(module._loss((x, y)))
    w = np.array([1, 1 / 2, 1 / 4, 1 / 5])
    assert loss == pytest.approx((w * err).sum() / w.sum(), rel=1e-5)
    assert loss != pytest.approx(err.mean(), rel=1e-3)


def test_without_the_full_model_the_network_is_free(game_data):
    masks, nll = game_data
    keep = ~masks.all(1)
    dm = MaskDataModule(masks[keep], nll[keep], seed=0)
    assert dm.full_target is None
    assert MaskDataModule(masks, nll, seed=0).full_target == pytest.approx(
        (np.log(2.0) - np.log(nll).mean()) / np.log(nll).std())
    net = MaskNet(N, hidden=8)
    assert net.architecture()["anchor"] is None
    with pytest.raises(ValueError, match="anchor must be finite"):
        MaskNet(N, anchor=float("nan"))
    anchored = MaskNet(N, hidden=8, anchor=0.25)
    with torch.no_grad():
        x = encode_masks(np.ones((3, N), bool))
        assert torch.allclose(anchored(x), torch.full((3,), 0.25))
        assert not torch.allclose(net(x), torch.full((3,), 0.25))


def _train_one(game_data, out: Path, seed: int) -> Path:
    dm = MaskDataModule(*game_data, seed=seed)
    train_ensemble(dm, out, members=1, seed=seed, **FAST)
    return out


# ------------------------------------------------------------------ metrics
def test_regression_metrics_against_independent_computations():
    y = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    p = np.array([1.2, 1.9, 3.5, 3.4, 5.1, 6.3])
    m = regression_metrics(y, p)
    assert m["n"] == 6
    assert m["r2"] == pytest.approx(r2_score(y, p), abs=1e-12)
    ranks_y, ranks_p = np.argsort(np.argsort(y)), np.argsort(np.argsort(p))  # no ties
    assert m["spearman"] == pytest.approx(np.corrcoef(ranks_y, ranks_p)[0, 1], abs=1e-12)
    pairs = [(i, j) for i in range(6) for j in range(i + 1, 6)]
    concordant = sum(np.sign(y[i] - y[j]) == np.sign(p[i] - p[j]) for i, j in pairs)
    assert m["kendall"] == pytest.approx((2 * concordant - len(pairs)) / len(pairs), abs=1e-12)  # one swap: 13/15
    assert m["kendall"] == pytest.approx(13 / 15)
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((y - p) ** 2)))
    # ties: Kendall tau-b against scipy, perfectly reversed order
    assert regression_metrics(y, -y)["spearman"] == pytest.approx(-1.0)
    yt, pt = np.array([1.0, 1.0, 2.0, 3.0]), np.array([1.0, 2.0, 2.0, 3.0])
    assert regression_metrics(yt, pt)["kendall"] == pytest.approx(stats.kendalltau(yt, pt).statistic)
    # undefined cases are None, never NaN
    assert regression_metrics(np.array([1.0]), np.array([2.0]))["r2"] is None
    const = regression_metrics(np.array([2.0, 2.0, 2.0]), np.array([1.0, 2.0, 3.0]))
    assert const["r2"] is None and const["spearman"] is None and const["kendall"] is None


def test_fit_metrics_per_stratum_and_table():
    masks = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]], bool)
    y = np.array([1.0, 2.0, 3.0, 6.0, 5.0, 4.0])
    p = np.array([1.1, 2.2, 2.9, 5.5, 5.6, 4.1])
    m = fit_metrics(masks, y, p)
    assert [s["removed"] for s in m["by_removed"]] == [1, 2]
    assert m["by_removed"][0]["r2"] == pytest.approx(r2_score(y[:3], p[:3]))
    assert m["by_removed"][1]["spearman"] == pytest.approx(stats.spearmanr(y[3:], p[3:]).statistic)
    assert m["overall"]["r2"] == pytest.approx(r2_score(y, p))
    table = format_metrics_table(m)
    assert "all" in table and "removed 1" in table and "removed 2" in table
    json.dumps(m, allow_nan=False)  # JSON-safe


def test_validation_rule_per_count():
    """stratum_verdict against hand cases (the one-sided p against scipy), not_validated on metadata."""
    assert stratum_verdict({"n": 4, "spearman": 1.0}) == "4 held-out rows < 5"
    assert stratum_verdict({"n": 9, "spearman": 0.38}) == "Spearman 0.38 < 0.5 on 9 held-out rows"
    assert "not above chance" in stratum_verdict({"n": 9, "spearman": 0.55})  # p 0.06 on 9 rows
    assert stratum_verdict({"n": 9, "spearman": 0.62}) is None                 # p 0.04
    assert stratum_verdict({"n": 30, "spearman": 0.5, "r2": -1.0}) is None     # R² does not decide
    assert stratum_verdict({"n": 6, "spearman": None}).startswith("Spearman undefined")
    x = np.arange(9.0)
    y = x[[1, 0, 5, 3, 2, 8, 4, 7, 6]]
    rho = stats.spearmanr(x, y)
    assert spearman_p(rho.statistic, 9) == pytest.approx(stats.spearmanr(x, y, alternative="greater").pvalue)
    by = [{"removed": 1, "n": 18, "spearman": 0.73}, {"removed": 2, "n": 9, "spearman": 0.2}]
    meta = {"removed_counts": [0, 1, 2, 3], "metrics": {"by_removed": by}, "architecture": {"anchor": -1.3},
            "split": {"protocol": "nested"}}
    assert not_validated(meta) == {2: "Spearman 0.20 < 0.5 on 9 held-out rows", 3: "no held-out row"}
    unanchored = {**meta, "architecture": {"anchor": None}}
    assert set(not_validated(unanchored)) == {0, 2, 3}
    old = {**meta, "split": {"rows": 10}}  # written before nested cross-validation: judged, and says so
    assert not_validated(old)[2].endswith("(out-of-fold metrics on the early-stopping folds; retrain)")
    assert not_validated({"removed_counts": [0, 1]}) is None


# ------------------------------------------------------------------ split and data
def test_stratified_folds_balance_and_determinism():
    removed = np.repeat([0, 1, 2, 3], [1, 10, 40, 3])
    fold = stratified_folds(removed, 4, seed=3)
    assert fold[0] == -1  # a single-row stratum (the full model) is always trained on
    assert set(fold[1:].tolist()) == {0, 1, 2, 3}
    for r in (1, 2, 3):
        per_fold = np.bincount(fold[removed == r], minlength=4)
        assert per_fold.max() - per_fold.min() <= 1  # each stratum dealt evenly over the folds
    assert (np.bincount(fold[removed == 2], minlength=4) == 10).all()
    for j in range(4):  # whichever two consecutive folds are out (scored, early stopping), every stratum keeps rows
        assert set(removed[(fold != j) & (fold != (j + 1) % 4)].tolist()) == {0, 1, 2, 3}
    assert np.array_equal(fold, stratified_folds(removed, 4, seed=3))
    assert not np.array_equal(fold, stratified_folds(removed, 4, seed=4))
    small = stratified_folds(np.repeat([1, 2, 3], [2, 3, 9]), 5, seed=0)
    assert (small[:2] == -1).all() and (small[2:] >= 0).all()  # two rows could both be out: always trained on
    assert folds_for(3, 0.2) == 5 and folds_for(10, 0.2) == 10 and folds_for(1, 0.5) == 3
    with pytest.raises(LayershapError, match="between 0 and 1"):
        folds_for(3, 1.0)
    with pytest.raises(LayershapError, match="at least 3 folds"):
        stratified_folds(removed, 2, seed=0)


def test_datamodule_normalisation_folds_and_errors(game_data):
    masks, nll = game_data
    dm = MaskDataModule(masks, nll, folds=5, seed=0)
    np.testing.assert_array_equal(dm.masks, canonical_masks())  # rows in content order, nll moved with them
    np.testing.assert_array_equal(dm.nll, smooth_game(dm.masks))
    shuffled = np.random.default_rng(1).permutation(len(nll))
    again = MaskDataModule(masks[shuffled], nll[shuffled], folds=5, seed=0)
    np.testing.assert_array_equal(again.masks, dm.masks)
    np.testing.assert_array_equal(again.fold_of, dm.fold_of)  # measurement order does not change the folds
    assert dm.target_mean == pytest.approx(np.log(nll).mean()) and dm.target_std == pytest.approx(np.log(nll).std())
    assert np.allclose(dm.standardize(nll), (np.log(nll) - np.log(nll).mean()) / np.log(nll).std())
    assert dm.removed_counts == [0, 1, 2, 3, 4, 5]
    seen = np.zeros(len(nll), int)
    for j in range(5):
        dm.hold_out(j)
        assert (dm.fold, dm.stop_fold) == (j, (j + 1) % 5)
        parts = (dm.train_index, dm.val_index, dm.test_index)
        assert sum(len(x) for x in parts) == len(nll) and len(np.unique(np.concatenate(parts))) == len(nll)
        assert (dm.fold_of[dm.test_index] == j).all() and (dm.fold_of[dm.val_index] == (j + 1) % 5).all()
        seen[dm.test_index] += 1
    assert set(seen.tolist()) == {0, 1} and seen.sum() == len(nll) - 1  # only the full-model row is never held out
    bad = nll.copy()
    bad[3] = np.nan
    with pytest.raises(LayershapError, match="NaN"):
        MaskDataModule(masks, bad)
    with pytest.raises(LayershapError, match="must be positive"):
        MaskDataModule(masks, nll - 3.0)
    with pytest.raises(LayershapError, match="same nll"):
        MaskDataModule(masks, np.full(len(masks), 3.0))
    with pytest.raises(LayershapError, match="a few dozen"):
        MaskDataModule(masks[:3], nll[:3])
    with pytest.raises(MaskError):
        MaskDataModule(np.full((10, N), 2), np.arange(10.0))


# ------------------------------------------------------------------ training on a known game
def test_ensemble_learns_smooth_game(ensemble_dir, game_data):
    with np.load(ensemble_dir / "validation.npz") as v:
        masks, measured, predicted, spread = v["masks"], v["measured"], v["predicted"], v["predicted_std"]
    assert np.array_equal(measured, smooth_game(masks))  # held-out targets are the game's values
    # 3 members are scored on folds 0, 1, 2 of 5 and assessment networks on folds 3, 4: every row of a
    # stratum with 3+ rows is held out once (all but the full model here)
    rows = canonical_masks()
    fold = stratified_folds((~rows).sum(1), 5, seed=0)
    expected = {row.tobytes() for row in rows[fold >= 0]}
    assert {row.tobytes() for row in masks} == expected and len(masks) == len(expected) == len(rows) - 1
    assert stats.spearmanr(measured, predicted).statistic >= 0.95
    metrics = json.loads((ensemble_dir / "returned_metrics.json").read_text())
    assert metrics["overall"]["spearman"] == pytest.approx(stats.spearmanr(measured, predicted).statistic)
    assert metrics["overall"]["r2"] == pytest.approx(r2_score(measured, predicted))
    assert np.all(spread > 0)  # three members with different seeds disagree a little everywhere
    assert (ensemble_dir / "fit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = (ensemble_dir / "history.csv").read_text().splitlines()
    assert history[0] == "member,epoch,train_loss,val_loss" and {line[0] for line in history[1:]} == {"0", "1", "2"}


def test_held_out_metrics_use_no_row_the_scoring_network_fitted_or_early_stopped_on(ensemble_dir):
    """By construction: the rows each network's loaders served (recorded at every setup) never include a row
    that network is scored on; every held-out row is scored exactly once; the metrics are those rows'."""
    meta = json.loads((ensemble_dir / "metadata.json").read_text())
    networks = meta["training"]["runs"] + meta["training"].get("assessment_runs", [])
    with np.load(ensemble_dir / "seen.npz") as s:
        seen = [({m.tobytes() for m in s[f"fit_{k}"]}, {m.tobytes() for m in s[f"stop_{k}"]})
                for k in range(len(networks))]
    with np.load(ensemble_dir / "validation.npz") as v:
        masks, measured, predicted = v["masks"], v["measured"], v["predicted"]
    rows = canonical_masks()
    fold = stratified_folds((~rows).sum(1), 5, seed=0)
    fold_of = {row.tobytes(): f for row, f in zip(rows, fold)}
    keys = [m.tobytes() for m in masks]
    assert len(keys) == len(set(keys))  # each held-out row scored once
    for key in keys:
        scorer = [k for k, run in enumerate(networks) if run["fold"] == fold_of[key]]
        assert len(scorer) == 1
        fit, stop = seen[scorer[0]]
        assert key not in fit and key not in stop
    for fit, stop in seen:  # and every network did fit and early-stop on something
        assert fit and stop and not fit & stop
    assert meta["metrics"] == json.loads(json.dumps(fit_metrics(masks, measured, predicted)))


def test_metadata_contents(ensemble_dir, game_data):
    meta = json.loads((ensemble_dir / "metadata.json").read_text())
    nll = game_data[1]
    assert meta["model_id"] == "synthetic" and meta["model_hash"] == "h0" and meta["n_layers"] == N
    assert meta["target"] == "log_nll"
    assert meta["target_mean"] == pytest.approx(np.log(nll).mean())
    assert meta["target_std"] == pytest.approx(np.log(nll).std())
    assert meta["removed_counts"] == [0, 1, 2, 3, 4, 5]
    assert meta["architecture"]["hidden"] == 32 and meta["architecture"]["depth"] == 2
    assert meta["training"]["members"] == 3 and meta["training"]["member_seeds"] == member_seeds(0, 3)
    assert len(set(meta["training"]["member_seeds"])) == 3
    assert meta["member_files"] == ["member_0.pt", "member_1.pt", "member_2.pt"]
    fold = stratified_folds((~canonical_masks()).sum(1), 5, seed=0)
    assert meta["split"]["folds"] == 5 and meta["split"]["rows"] == len(nll)
    assert meta["split"]["held_out"] == int((fold >= 0).sum()) and meta["split"]["protocol"] == "nested"
    assert [(run["fold"], run["stop_fold"]) for run in meta["training"]["runs"]] == [(0, 1), (1, 2), (2, 3)]
    assert [(run["fold"], run["stop_fold"]) for run in meta["training"]["assessment_runs"]] == [(3, 4), (4, 0)]


def test_checkpoint_round_trip_and_value_function(ensemble_dir):
    sur = load_surrogate(ensemble_dir)
    with np.load(ensemble_dir / "validation.npz") as v:
        masks, predicted, spread = v["masks"], v["predicted"], v["predicted_std"]
    assert np.array_equal(sur.predict_std(masks), spread)  # bitwise, as computed before saving
    # independent recomputation from the raw member networks
    x = torch.from_numpy(masks.astype(np.float32) * 2 - 1)
    with torch.no_grad():
        outs = np.stack([net(x).double().numpy() for net in sur.nets])
    member_nll = np.exp(outs * sur.target_std + sur.target_mean)
    assert np.allclose(member_nll.std(0, ddof=1), spread, atol=1e-6)
    assert np.allclose(member_nll.mean(0), sur.predict_nll(masks), atol=1e-6)
    assert np.allclose(sur(masks), -member_nll.mean(0), atol=1e-6)
    # held out: each row of folds 0..2 is predicted by the member scored on its fold (member j: fold j)
    rows = canonical_masks()
    fold = stratified_folds((~rows).sum(1), 5, seed=0)
    fold_of = {row.tobytes(): f for row, f in zip(rows, fold)}
    row_fold = np.array([fold_of[row.tobytes()] for row in masks])
    with np.load(ensemble_dir / "validation.npz") as v:
        assert np.array_equal(v["fold"], row_fold)
        assert np.array_equal(v["member"], np.where(row_fold < 3, row_fold, -1))
    by_member = row_fold < 3
    assert np.allclose(predicted[by_member], member_nll[row_fold[by_member], np.flatnonzero(by_member)], atol=1e-6)
    assert not np.allclose(predicted, member_nll.mean(0), atol=1e-6)  # not the ensemble mean (that saw the rows)
    # chunking does not change the answer
    small = Surrogate(sur.nets, sur.metadata, chunk_size=7)
    assert np.allclose(small.predict_nll(masks), sur.predict_nll(masks), atol=1e-6)
    assert sur.members == 3 and sur.n_layers == N and sur.removed_counts == [0, 1, 2, 3, 4, 5]


def test_same_seed_identical_weights_different_seed_differs(tmp_path, game_data, ensemble_dir):
    a = _train_one(game_data, tmp_path / "a", seed=0)
    b = _train_one(game_data, tmp_path / "b", seed=0)
    c = _train_one(game_data, tmp_path / "c", seed=1)
    sa, sb, sc = (torch.load(d / "member_0.pt", weights_only=True) for d in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # member 0 of the 3-member ensemble with seed 0 had the same seed and split
    se = torch.load(ensemble_dir / "member_0.pt", weights_only=True)
    assert all(torch.equal(sa[k], se[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    probe = stratified_masks(N, 300, seed=9, removed=range(1, N + 1))
    pa, pb, pc = (load_surrogate(d).predict_nll(probe) for d in (a, b, c))
    assert np.array_equal(pa, pb)
    assert not np.array_equal(pa, pc)
    assert np.all(load_surrogate(a).predict_std(probe) == 0.0)  # a single member has no spread


def test_wrong_mask_length_is_mask_error(ensemble_dir):
    sur = load_surrogate(ensemble_dir)
    for bad in (np.ones((2, N + 1), bool), np.ones(N - 1, bool), np.ones((2, 3, N), bool)):
        with pytest.raises(MaskError):
            sur.predict_nll(bad)
    with pytest.raises(MaskError, match="10 decoder layers"):
        sur(np.ones((1, 12), bool))
    with pytest.raises(MaskError):
        sur.predict_std(np.full((1, N), 2))
    assert sur.predict_nll(np.ones(N, bool)).shape == (1,)  # one 1-D mask is one row


def test_million_masks_in_chunks():
    n = 20
    torch.manual_seed(0)
    net = MaskNet(n, hidden=8, depth=2)
    sur = Surrogate([net], {"n_layers": n, "target": "log_nll", "target_mean": 1.0, "target_std": 0.5,
                            "removed_counts": [1]})
    codes = np.arange(2**n, dtype=np.uint32)
    masks = ((codes[:, None] >> np.arange(n, dtype=np.uint32)) & 1).astype(bool)
    pred = sur.predict_nll(masks)
    assert pred.shape == (2**n,) and pred.dtype == np.float64 and np.isfinite(pred).all()
    rows = np.array([0, 12345, 2**n - 1])
    with torch.no_grad():
        direct = np.exp(net(encode_masks(masks[rows])).double().numpy() * 0.5 + 1.0)
    assert np.allclose(pred[rows], direct, atol=1e-6)


def test_load_errors(tmp_path):
    with pytest.raises(LayershapError, match="not a trained surrogate"):
        load_surrogate(tmp_path / "nowhere")
    (tmp_path / "metadata.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(LayershapError, match="not a layershap surrogate"):
        load_surrogate(tmp_path)


# ------------------------------------------------------------------ store + CLI
def _store(path: Path, masks: np.ndarray, nll: np.ndarray, model_hash: str = "hash-a", n_layers: int = N):
    from layershap.oracle.store import DatasetStore
    from layershap.oracle.text import windows_sha256

    windows = np.arange(2 * 9, dtype=np.int64).reshape(2, 9)
    identity = {
        "model_id": "tiny/synthetic", "model_hash": model_hash, "n_layers": n_layers,
        "layer_types": ["full_attention"] * n_layers, "text_id": "builtin", "windows_sha256": windows_sha256(windows),
        "n_windows": 2, "seq_len": 8, "dtype": "float32",
    }
    store = DatasetStore.create_or_open(path, identity, windows)
    store.append(masks, nll, np.full(len(masks), 0.01))
    return store


def test_train_cli_end_to_end_and_store_checks(tmp_path, game_data, capsys):
    from layershap.cli.main import main
    from layershap.oracle.identity import check_same_model
    from layershap.oracle.store import DatasetStore

    masks, nll = game_data
    store = _store(tmp_path / "data.zarr", masks, nll)
    out = tmp_path / "sur"
    rc = main(["train", str(tmp_path / "data.zarr"), "--out", str(out), "--members", "2", "--max-epochs", "30",
               "--hidden", "32", "--lr", "5e-3", "--patience", "10", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "Spearman" in printed and "Kendall" in printed and "removed 5" in printed and str(out) in printed
    assert "fit.png" in printed
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["dataset_hash"] == DatasetStore.open(tmp_path / "data.zarr").content_hash()
    assert meta["model_id"] == "tiny/synthetic" and meta["model_hash"] == "hash-a" and meta["n_layers"] == N
    assert meta["dataset"]["text_id"] == "builtin"
    # the printed overall Spearman is the one in metadata and agrees with validation.npz
    with np.load(out / "validation.npz") as v:
        rho = stats.spearmanr(v["measured"], v["predicted"]).statistic
    assert meta["metrics"]["overall"]["spearman"] == pytest.approx(rho)
    overall = next(line for line in printed.splitlines() if line.startswith("all"))
    assert f"{rho:.3f}" in overall

    sur = load_surrogate(out)
    check_same_model(sur.metadata, store.attrs, what="the surrogate", fix="retrain")  # same model: fine
    other = _store(tmp_path / "other.zarr", masks[:20], nll[:20], model_hash="hash-b")
    with pytest.raises(StoreMismatchError, match="model_hash"):
        check_same_model(sur.metadata, other.attrs, what="the surrogate", fix="retrain")
    m12 = stratified_masks(12, 20, seed=0)
    wider = _store(tmp_path / "wider.zarr", m12, np.linspace(2, 3, 20), n_layers=12)
    with pytest.raises(StoreMismatchError, match="n_layers"):
        check_same_model(sur.metadata, wider.attrs, what="the surrogate", fix="retrain")

    rc = main(["train", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "x")])
    assert rc == 2 and "no dataset store" in capsys.readouterr().err


def test_predict_chunk_keeps_activations_near_two_mib():
    for hidden in (8, 64, 128, 256, 1000):
        chunk = predict_chunk(hidden)
        assert chunk & (chunk - 1) == 0  # a power of two
        assert chunk >= 256
        assert chunk == 256 or chunk * hidden * 4 <= PREDICT_CHUNK_BYTES < 2 * chunk * hidden * 4
    net = MaskNet(N, hidden=64, depth=2)
    sur = Surrogate([net], {"n_layers": N, "target": "log_nll", "target_mean": 1.0, "target_std": 0.5,
                            "removed_counts": [1]})
    assert sur.chunk_size == predict_chunk(64) == 8192
