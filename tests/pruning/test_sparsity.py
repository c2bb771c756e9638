"""Sparsity export (layershap's bounded mapping of scores): exact mean, bounds, order reversed from importance,
degenerate cases, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from layershap.cli.main import main
from layershap.core.errors import LayershapError
from layershap.pruning.sparsity import bounded_sparsities
from layershap.shapley.game import Scores
from layershap.shapley.scores_io import write_scores


def _check(scores: np.ndarray, target: float, lam: float) -> np.ndarray:
    s = bounded_sparsities(scores, target, lam)
    assert abs(s.mean() - target) < 1e-9
    assert (s >= max(0.0, target - lam) - 1e-12).all() and (s <= min(1.0, target + lam) + 1e-12).all()
    # more important (higher score) -> never higher sparsity
    order = np.argsort(scores, kind="stable")
    assert (np.diff(s[order]) <= 1e-12).all()
    return s


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("target,lam", [(0.7, 0.08), (0.5, 0.3), (0.05, 0.1), (0.97, 0.08), (0.0, 0.2)])
def test_mean_bounds_and_order(seed, target, lam):
    scores = np.random.default_rng(seed).standard_normal(18) ** 3  # skewed: forces clipping at one bound
    _check(scores, target, lam)


def test_unclipped_case_is_the_plain_linear_map():
    # symmetric scores: the linear map already has mean = target, nothing to shift or clip
    s = _check(np.array([0.0, 1.0, 2.0, 3.0, 4.0]), 0.6, 0.1)
    np.testing.assert_allclose(s, [0.7, 0.65, 0.6, 0.55, 0.5], atol=1e-12)


def test_clipping_holds_the_bound_and_moves_the_others():
    # one very important layer: after the shift it would fall below target - lam, so it sits on the bound
    s = _check(np.array([0.0, 0.0, 0.0, 0.0, 10.0]), 0.7, 0.08)
    np.testing.assert_allclose(s, [0.72, 0.72, 0.72, 0.72, 0.62], atol=1e-12)


def test_degenerate_inputs():
    np.testing.assert_array_equal(bounded_sparsities(np.full(6, 0.3), 0.7, 0.08), np.full(6, 0.7))
    np.testing.assert_array_equal(bounded_sparsities(np.arange(4.0), 0.4, 0.0), np.full(4, 0.4))
    with pytest.raises(LayershapError, match="NaN"):
        bounded_sparsities(np.array([1.0, np.nan]), 0.5, 0.1)
    with pytest.raises(LayershapError, match="--sparsity"):
        bounded_sparsities(np.ones(3), 1.5, 0.1)
    with pytest.raises(LayershapError, match="--lambda"):
        bounded_sparsities(np.ones(3), 0.5, -0.1)


def test_export_cli(tmp_path, capsys):
    values = np.array([0.30, -0.01, 0.05, 1.20, 0.02, 0.11])
    scores = Scores(values=values, stderr=np.zeros(6), method="exact", index="shapley", n_evals=64)
    path = tmp_path / "scores.json"
    write_scores(path, scores, {"model_id": "tiny-llama", "model_hash": "abc", "n_layers": 6})
    out = tmp_path / "sp.json"
    assert main(["export", str(path), "--sparsity", "0.7", "--lambda", "0.08", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    sp = np.array(doc["sparsities"])
    assert doc["model_id"] == "tiny-llama" and doc["layers"] == list(range(6))
    assert doc["target"] == 0.7 and doc["lambda"] == 0.08 and doc["source_scores"] == str(path)
    assert abs(sp.mean() - 0.7) < 1e-9
    assert int(np.argmin(sp)) == 3 and int(np.argmax(sp)) == 1  # most important layer -> least sparsity
    assert "mean sparsity 0.700000" in capsys.readouterr().out
    # default output path beside the scores file
    assert main(["export", str(path), "--sparsity", "0.5"]) == 0
    assert (tmp_path / "scores.sparsity-0.5.json").is_file()
    assert main(["export", str(tmp_path / "missing.json"), "--sparsity", "0.5"]) == 2
