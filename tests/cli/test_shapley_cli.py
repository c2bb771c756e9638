"""`layershap shapley` on real trained surrogates (tiny synthetic stores), the scores JSON and the plots."""

from __future__ import annotations

import itertools
import json
import math
import shutil

import numpy as np
import pytest

from layershap.cli.main import main
from layershap.core.errors import LayershapError
from layershap.oracle.store import DatasetStore
from layershap.oracle.text import windows_sha256
from layershap.shapley.game import Scores
from layershap.shapley.scores_io import read_scores, write_scores
from layershap.shapley.semivalues import Index, choose_index, coverage_report
from layershap.surrogate.checkpoint import load_surrogate
from layershap.surrogate.train import train_surrogate

N = 6
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def all_masks(n: int) -> np.ndarray:
    codes = np.arange(2**n)
    return ((codes[:, None] >> np.arange(n)) & 1).astype(bool)


def game_nll(masks: np.ndarray) -> np.ndarray:
    """A smooth synthetic 'model': each kept layer lowers the nll, layers 0 and 1 are partly redundant."""
    x = masks.astype(np.float64)
    w = np.array([0.9, 0.7, 0.2, 1.1, 0.4, 0.6])
    return 6.0 - x @ w + 0.8 * x[:, 0] * x[:, 1]


def make_surrogate(root, masks: np.ndarray, members: int) -> str:
    windows = np.random.default_rng(0).integers(0, 300, size=(2, 9), dtype=np.int64)
    identity = {
        "model_id": "synthetic/game", "model_hash": "c" * 64, "n_layers": N, "layer_types": ["full_attention"] * N,
        "text_id": "synthetic", "windows_sha256": windows_sha256(windows), "n_windows": 2, "seq_len": 8,
        "dtype": "float32",
    }
    store = DatasetStore.create_or_open(root / "data.zarr", identity, windows)
    store.append(masks, game_nll(masks), np.ones(len(masks)))
    # 64 masks = one batch per epoch: 400 Adam steps let the anchored network fit the game (100 left it halfway)
    train_surrogate(root / "data.zarr", root / "surrogate", members=members, seed=0, hidden=32, max_epochs=400,
                    lr=3e-3, progress=False)
    return str(root / "surrogate")


@pytest.fixture(scope="module")
def partial_surrogate(tmp_path_factory) -> str:
    """Trained on every mask with at most 3 of 6 layers removed (removed counts 0..3)."""
    masks = all_masks(N)
    return make_surrogate(tmp_path_factory.mktemp("partial"), masks[(~masks).sum(1) <= 3], members=1)


@pytest.fixture(scope="module")
def full_surrogate(tmp_path_factory) -> str:
    """A 2-member ensemble trained on all 64 masks (every removed count 0..6)."""
    return make_surrogate(tmp_path_factory.mktemp("full"), all_masks(N), members=2)


def brute_semivalue(values: dict, n: int, weight_of_size) -> np.ndarray:
    phi = np.zeros(n)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        for s in range(n):
            for subset in itertools.combinations(others, s):
                without = tuple(j in subset for j in range(n))
                with_i = tuple(j in subset or j == i for j in range(n))
                phi[i] += weight_of_size(s) * (values[with_i] - values[without])
    return phi


def surrogate_values(path: str) -> dict:
    """v(S) = −predicted nll for every mask, in one call (a float32 network's output can differ by ~1e-7
    between batch shapes, so Monte Carlo comparisons below allow 1e-6 on top of 4 standard errors)."""
    sur = load_surrogate(path)
    masks = all_masks(N)
    return {tuple(m): float(v) for m, v in zip(masks, -sur.predict_nll(masks))}


def shapley_weight(n):
    return lambda s: math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n)


def range_weight(n, a, b):
    return lambda s: 1.0 / ((b - a + 1) * math.comb(n - 1, s)) if a <= n - s <= b else 0.0


def read_doc(path) -> dict:
    """A scores file that :func:`read_scores` accepts, as its JSON document."""
    read_scores(path)
    return json.loads(open(path).read())


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = main(["shapley", *args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_default_index_is_the_covered_semivalue(partial_surrogate, tmp_path, capsys):
    out = tmp_path / "scores.json"
    code, stdout, stderr = run_cli([partial_surrogate, "--out", str(out), "--no-progress"], capsys)
    assert code == 0, stderr
    assert "warning" not in stderr
    doc = json.loads(out.read_text())
    assert doc["index"] == "semivalue[1:3]" and doc["method"] == "exact"
    assert doc["utility"] == "-nll (nats)" and doc["n_layers"] == N and doc["model_id"] == "synthetic/game"
    assert doc["dataset_hash"] == load_surrogate(partial_surrogate).metadata["dataset_hash"]
    assert doc["surrogate_metrics"]["overall"]["r2"] is not None
    assert doc["coverage"]["uncovered"] == [] and doc["coverage"]["removed_counts_in_data"] == [0, 1, 2, 3]
    expected = brute_semivalue(surrogate_values(partial_surrogate), N, range_weight(N, 1, 3))
    np.testing.assert_allclose(doc["scores"], expected, atol=1e-9)
    assert doc["stderr"] == [0.0] * N
    assert doc["ranking"] == [int(i) for i in np.argsort(expected, kind="stable")]
    assert doc["efficiency"]["applies"] is False
    # table: one row per layer with score and rank; PNGs next to the JSON
    for i in range(N):
        assert any(line.split()[:1] == [str(i)] and f"{expected[i]:.6f}" in line for line in stdout.splitlines())
    for png in ("scores.png", "scores_fit.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_MAGIC


def test_auto_index_leaves_out_a_count_with_poor_held_out_metrics(partial_surrogate, tmp_path, capsys):
    """The same surrogate, its metadata saying the 3-removed masks were ordered at Spearman 0.1 on their
    held-out rows: auto stops at 2 removed and the coverage says why; asking for 1:3 warns with the reason."""
    copy = tmp_path / "sur"
    shutil.copytree(partial_surrogate, copy)
    meta = json.loads((copy / "metadata.json").read_text())
    assert meta["split"]["protocol"] == "nested" and meta["removed_counts"] == [0, 1, 2, 3]
    assert [s["removed"] for s in meta["metrics"]["by_removed"]] == [1, 2, 3]  # every count validated as trained
    run_cli([str(copy), "--out", str(tmp_path / "before.json"), "--no-progress"], capsys)
    assert json.loads((tmp_path / "before.json").read_text())["index"] == "semivalue[1:3]"
    meta["metrics"]["by_removed"][2].update(spearman=0.1, kendall=0.05, r2=-0.5)
    (copy / "metadata.json").write_text(json.dumps(meta))
    code, _, stderr = run_cli([str(copy), "--out", str(tmp_path / "auto.json"), "--no-progress"], capsys)
    assert code == 0 and "warning" not in stderr
    doc = json.loads((tmp_path / "auto.json").read_text())
    assert doc["index"] == "semivalue[1:2]"
    assert doc["coverage"]["not_validated"] == [{"removed": 3, "why": "Spearman 0.10 < 0.5 on 20 held-out rows"}]
    code, _, stderr = run_cli([str(copy), "--out", str(tmp_path / "asked.json"), "--sizes", "1:3", "--no-progress"],
                              capsys)
    assert code == 0 and "held-out metrics do not validate" in stderr and "3: Spearman 0.10" in stderr


def test_shapley_on_partial_data_warns_with_uncovered_counts(partial_surrogate, tmp_path, capsys):
    out = tmp_path / "shap.json"
    code, _, stderr = run_cli([partial_surrogate, "--out", str(out), "--index", "shapley", "--no-progress"], capsys)
    assert code == 0
    assert "warning" in stderr and "4-6 layers removed" in stderr
    doc = read_doc(out)
    assert doc["index"] == "shapley" and doc["coverage"]["uncovered"] == [4, 5, 6] and doc["warnings"]
    values = surrogate_values(partial_surrogate)
    np.testing.assert_allclose(doc["scores"], brute_semivalue(values, N, shapley_weight(N)), atol=1e-9)
    full, empty = values[(True,) * N], values[(False,) * N]
    assert doc["efficiency"]["ok"] and abs(sum(doc["scores"]) - (full - empty)) < 1e-9
    assert (tmp_path / "shap.png").read_bytes()[:8] == PNG_MAGIC


def test_full_data_shapley_with_interactions(full_surrogate, tmp_path, capsys):
    # every mask is in the data, but the empty model is one row, never held out: auto stops at 5 removed, and
    # the Shapley value (asked for) warns that it weights 6 removed, which no held-out row validates
    auto = tmp_path / "auto.json"
    code, _, stderr = run_cli([full_surrogate, "--out", str(auto), "--no-progress"], capsys)
    assert code == 0 and "warning" not in stderr
    assert read_doc(auto)["index"] == "semivalue[1:5]"
    assert read_doc(auto)["coverage"]["not_validated"] == [{"removed": 6, "why": "no held-out row"}]
    out = tmp_path / "s.json"
    code, stdout, stderr = run_cli([full_surrogate, "--out", str(out), "--index", "shapley", "--interactions",
                                    "--no-progress"], capsys)
    assert code == 0 and "6: no held-out row" in stderr
    doc = read_doc(out)
    assert doc["index"] == "shapley"
    values = surrogate_values(full_surrogate)
    np.testing.assert_allclose(doc["scores"], brute_semivalue(values, N, shapley_weight(N)), atol=1e-9)
    inter = np.array(doc["interactions"])
    # brute force I_01 over S ⊆ N∖{0,1}
    i01 = 0.0
    for s in range(N - 1):
        w = math.factorial(s) * math.factorial(N - s - 2) / math.factorial(N - 1)
        for subset in itertools.combinations(range(2, N), s):
            base = [j in subset for j in range(N)]
            both, only0, only1 = base.copy(), base.copy(), base.copy()
            both[0] = both[1] = only0[0] = only1[1] = True
            i01 += w * (values[tuple(both)] - values[tuple(only0)] - values[tuple(only1)] + values[tuple(base)])
    assert abs(inter[0, 1] - i01) < 1e-9 and np.allclose(inter, inter.T)
    assert inter[0, 1] < -0.4  # the game makes layers 0 and 1 redundant (+0.8 nll when both are kept)
    assert "strongest pairwise interaction" in stdout
    assert (tmp_path / "s_interactions.png").read_bytes()[:8] == PNG_MAGIC


def test_monte_carlo_through_the_cli_is_seeded_and_close(full_surrogate, tmp_path, capsys):
    exact = tmp_path / "exact.json"
    assert run_cli([full_surrogate, "--out", str(exact), "--index", "shapley", "--no-progress"], capsys)[0] == 0
    docs = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        path = tmp_path / f"{name}.json"
        code, _, _ = run_cli([full_surrogate, "--out", str(path), "--index", "shapley", "--method", "mc",
                              "--mc-evals", "3000", "--seed", str(seed), "--no-progress"], capsys)
        assert code == 0
        docs.append(read_doc(path))
    a, b, c = docs
    assert a["method"] == "mc-permutation" and a["n_evals"] <= 3000
    assert a["scores"] == b["scores"] and a["stderr"] == b["stderr"] and a["scores"] != c["scores"]
    truth = np.array(read_doc(exact)["scores"])
    assert np.all(np.abs(np.array(a["scores"]) - truth) <= 4 * np.array(a["stderr"]) + 1e-6)
    strat = tmp_path / "strat.json"
    code, _, _ = run_cli([full_surrogate, "--out", str(strat), "--method", "mc", "--sizes", "2:4", "--mc-evals", "4000",
                          "--no-progress"], capsys)
    doc = read_doc(strat)
    assert code == 0 and doc["method"] == "mc-stratified" and doc["index"] == "semivalue[2:4]"
    expected = brute_semivalue(surrogate_values(full_surrogate), N, range_weight(N, 2, 4))
    assert np.all(np.abs(np.array(doc["scores"]) - expected) <= 4 * np.array(doc["stderr"]) + 1e-6)


def test_bad_options_are_clear_errors(partial_surrogate, tmp_path, capsys):
    code, _, err = run_cli([partial_surrogate, "--out", str(tmp_path / "x.json"), "--sizes", "0:3"], capsys)
    assert code == 2 and "--sizes" in err
    code, _, err = run_cli([partial_surrogate, "--out", str(tmp_path / "x.json"), "--index", "banzhaf",
                            "--sizes", "1:2"], capsys)
    assert code == 2 and "cannot be combined" in err
    code, _, err = run_cli([partial_surrogate, "--out", str(tmp_path / "x.txt")], capsys)
    assert code == 2 and ".json" in err
    code, _, err = run_cli([str(tmp_path), "--out", str(tmp_path / "x.json")], capsys)
    assert code == 2 and "layershap train" in err
    code, _, err = run_cli([partial_surrogate, "--out", str(tmp_path / "x.json"), "--method", "mc", "--mc-evals", "5"],
                           capsys)
    assert code == 2 and "--mc-evals" in err
    assert not (tmp_path / "x.json").exists()


def test_choose_index_and_coverage_warning():
    assert choose_index("auto", None, list(range(9)), 8) == Index("shapley")
    assert choose_index("auto", None, [0, 1, 2, 5], 8) == Index("semivalue", 1, 2)
    assert choose_index("semivalue", None, [0, 1, 2, 3], 8) == Index("semivalue", 1, 3)
    assert choose_index("auto", "2:5", [0, 1], 8) == Index("semivalue", 2, 5)
    with pytest.warns(UserWarning, match="coverage is unknown"):
        assert choose_index("auto", None, None, 8) == Index("shapley")
    with pytest.warns(UserWarning, match=r"0, 6-8 layers removed"):
        report = coverage_report(Index("banzhaf"), [1, 2, 3, 4, 5], 8)
    assert report["uncovered"] == [0, 6, 7, 8]
    with pytest.raises(LayershapError):
        choose_index("auto", None, [2, 3], 8)
    # counts the held-out metrics do not validate are left out of auto, and reported with the reason
    assert choose_index("auto", None, list(range(9)), 8, {5: "Spearman 0.2 < 0.5"}) == Index("semivalue", 1, 4)
    assert choose_index("semivalue", None, [0, 1, 2, 3], 8, {3: "2 held-out rows < 5"}) == Index("semivalue", 1, 2)
    # no count from 1 on validated: leave-one-out on the surrogate, the least extrapolation (coverage warns)
    assert choose_index("auto", None, [0, 1, 2], 8, {1: "4 held-out rows < 5"}) == Index("semivalue", 1, 1)
    with pytest.warns(UserWarning, match=r"\(1: 4 held-out rows < 5\)"):
        coverage_report(Index("semivalue", 1, 1), [0, 1, 2], 8, {1: "4 held-out rows < 5"})
    with pytest.raises(LayershapError, match="0 removed: no held-out row"):
        choose_index("auto", None, [0, 1, 2], 8, {0: "no held-out row", 1: "4 held-out rows < 5"})
    with pytest.warns(UserWarning, match=r"do not validate it \(5: Spearman 0.2 < 0.5\)"):
        report = coverage_report(Index("semivalue", 1, 6), list(range(9)), 8, {5: "Spearman 0.2 < 0.5"})
    assert report["uncovered"] == [] and report["not_validated"] == [{"removed": 5, "why": "Spearman 0.2 < 0.5"}]
    assert coverage_report(Index("semivalue", 1, 3), [0, 1, 2, 3], 8)["not_validated"] is None  # unknown


def test_scores_json_round_trip_and_validation(tmp_path):
    scores = Scores(np.array([0.3, -0.1, 0.2]), np.array([0.01, 0.02, 0.0]), "mc-stratified", "semivalue[1:2]", 100,
                    {"seconds": 1.5, "interactions": np.array([[0, 1.0, 2], [1, 0, 3], [2, 3, 0]])})
    path = tmp_path / "s.json"
    write_scores(path, scores, {"model_id": "m", "n_layers": 3, "dataset_hash": "h", "metrics": {"r2": 0.9}})
    doc = read_doc(path)
    assert doc["ranking"] == [1, 2, 0] and doc["prune_rank"] == [3, 1, 2]
    assert doc["dataset_hash"] == "h" and doc["surrogate_metrics"] == {"r2": 0.9}
    back = read_scores(path)
    assert back.dataset_hash == "h" and back.surrogate_metrics == {"r2": 0.9} and back.model_id == "m"
    np.testing.assert_array_equal(back.scores.values, scores.values)
    np.testing.assert_array_equal(back.scores.stderr, scores.stderr)
    np.testing.assert_array_equal(back.scores.extra["interactions"], scores.extra["interactions"])
    assert back.scores.ranking().tolist() == [1, 2, 0]
    with pytest.raises(LayershapError, match="4-layer"):
        write_scores(path, scores, {"n_layers": 4})
    (tmp_path / "other.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(LayershapError, match="not a layershap scores file"):
        read_scores(tmp_path / "other.json")
    with pytest.raises(LayershapError, match="no scores file"):
        read_scores(tmp_path / "missing.json")
    doc["ranking"] = [0, 0, 1]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(LayershapError, match="inconsistent"):
        read_scores(tmp_path / "bad.json")
