"""Per-layer budgets: OWL outlier ratios and allocation against hand-computed cases, exact means, bad budgets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from torch import nn

from layershap.core.errors import LayershapError
from layershap.oracle.layers import find_layers
from layershap.pruning.allocation import check_budget, group_counts, layer_budgets, outlier_ratio, zero_counts
from layershap.pruning.sparsify import owl_outlier_ratios


def test_outlier_ratio_hand_case():
    # mean 4, m = 2 -> threshold 8: only 13 is above
    assert outlier_ratio(torch.tensor([1.0, 1.0, 1.0, 13.0]), m=2.0) == 0.25
    # mean 160/6, m = 2 -> threshold 53.33: 100 and 59 are above (2 of 6); m = 5 -> 133.3: none
    w = torch.tensor([[1.0, 0.0], [0.0, 100.0], [59.0, 0.0]])
    assert outlier_ratio(w, m=2.0) == 2 / 6 and outlier_ratio(w, m=5.0) == 0.0
    # a threshold exactly at an entry does not count it (strictly above): mean 2.5, m = 2 -> 5
    assert outlier_ratio(torch.tensor([0.0, 0.0, 5.0, 5.0]), m=2.0) == 0.0


def test_owl_allocation_is_the_papers_formula_on_uneven_ratios():
    # OWL (Yin et al. 2024): a = (r - min)/(max - min) * 2*lam; density = a - mean(a) + (1 - t); sparsity = 1 - density.
    # r = [.001 x4, .01], t = 0.7, lam = 0.08: a = [0, 0, 0, 0, 0.16], mean(a) = 0.032,
    # sparsity = 0.7 + 0.032 - a = [0.732 x4, 0.572] (a bounded map would clip the last one to 0.62 instead)
    got = layer_budgets("owl", 5, 0.7, 0.08, np.array([0.001, 0.001, 0.001, 0.001, 0.01]))
    np.testing.assert_allclose(got, [0.732, 0.732, 0.732, 0.732, 0.572], rtol=0, atol=1e-12)
    assert got.mean() == pytest.approx(0.7, abs=1e-15) and got.max() - got.min() == pytest.approx(0.16, abs=1e-15)
    # one layer with few outliers: a = [0.18, 0.18, 0.18, 0], mean 0.135, t = 0.5, lam = 0.09
    got = layer_budgets("owl", 4, 0.5, 0.09, np.array([0.03, 0.03, 0.03, 0.002]))
    np.testing.assert_allclose(got, [0.455, 0.455, 0.455, 0.635], rtol=0, atol=1e-12)
    # evenly spaced ratios: [t+lam, t+lam/3, t-lam/3, t-lam]
    t, lam = 0.6, 0.09
    got = layer_budgets("owl", 4, t, lam, np.array([0.01, 0.02, 0.03, 0.04]))
    np.testing.assert_allclose(got, [t + lam, t + lam / 3, t - lam / 3, t - lam], rtol=0, atol=1e-12)
    np.testing.assert_allclose(layer_budgets("owl", 3, 0.5, 0.1, np.array([0.01, 0.03, 0.02])), [0.6, 0.4, 0.5],
                               atol=1e-12)
    # scores keep layershap's bounded mapping: the same uneven values stay within lam of the target
    np.testing.assert_allclose(layer_budgets("scores", 5, 0.7, 0.08, np.array([0.001] * 4 + [0.01])),
                               [0.72, 0.72, 0.72, 0.72, 0.62], rtol=0, atol=1e-12)


def test_owl_refuses_a_lambda_that_leaves_zero_one():
    # t = 0.05, lam = 0.08, one outlier-rich layer: it would get 0.05 + 0.16*(1/5 - 1) = -0.078; the lowest layer
    # sits 2*lam*(1 - mean u) below t, so lam must stay below 0.05 / (2 * 4/5) = 0.03125
    with pytest.raises(LayershapError, match=r"-0.078.*use --lambda below 0.03125"):
        layer_budgets("owl", 5, 0.05, 0.08, np.array([0.001, 0.001, 0.001, 0.001, 0.01]))
    # the same target and lam fit when most layers are outlier-rich: 0.05 + 0.16*(4/5 - u) in [0.018, 0.178]
    got = layer_budgets("owl", 5, 0.05, 0.08, np.array([0.01, 0.01, 0.01, 0.01, 0.001]))
    np.testing.assert_allclose(got, [0.018] * 4 + [0.178], rtol=0, atol=1e-12)


def test_score_budgets_mean_exactly_the_target_and_respect_order():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.standard_exponential(18) ** 2  # skewed, like layer scores
        target, lam = rng.uniform(0.3, 0.8), rng.uniform(0.0, 0.15)
        lam = min(lam, target, 0.999 - target)
        b = layer_budgets("scores", 18, target, lam, scores)
        assert abs(b.mean() - target) < 1e-12
        assert b.min() >= target - lam - 1e-12 and b.max() <= target + lam + 1e-12
        order = np.argsort(scores)
        assert np.all(np.diff(b[order]) <= 1e-12)  # more important never pruned more
    assert np.array_equal(layer_budgets("uniform", 5, 0.7, 0.08), np.full(5, 0.7))


def test_owl_outlier_ratios_match_a_reference_from_captured_inputs(one_thread):
    model = make_tiny_model("llama", n_layers=2, seed=9)
    with torch.no_grad():  # plant a few large weights so some scores exceed 5x the mean
        find_layers(model).layers[1].mlp.down_proj.weight[:3, :3] *= 40.0
    windows = np.random.default_rng(1).integers(3, 300, size=(2, 16))
    captured: dict[nn.Module, list[np.ndarray]] = {}
    linears = [[m for m in layer.modules() if isinstance(m, nn.Linear)] for layer in find_layers(model).layers]
    hooks = [m.register_forward_pre_hook(lambda mod, a: captured.setdefault(mod, []).append(
        a[0].detach().double().reshape(-1, a[0].shape[-1]).numpy())) for layer in linears for m in layer]
    with torch.no_grad():
        model(input_ids=torch.as_tensor(windows), use_cache=False)
    for h in hooks:
        h.remove()
    expected = []
    for layer in linears:
        scores = np.concatenate([
            (np.abs(m.weight.detach().double().numpy()) * np.sqrt((np.concatenate(captured[m]) ** 2).sum(0))).ravel()
            for m in layer])
        expected.append((scores > 5.0 * scores.mean()).mean())
    got = owl_outlier_ratios(model, windows)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert got[1] > 0.0


def test_whole_weight_counts_keep_the_total():
    assert zero_counts(np.array([0.25, 0.75]), np.array([10, 10])).tolist() == [3, 7]  # 2.5 -> 3 (tie: first)
    counts = zero_counts(np.array([0.333, 0.5, 0.667]), np.array([1000, 1000, 1000]))
    assert counts.tolist() == [333, 500, 667] and counts.sum() == 1500
    assert group_counts(np.full(4, 0.5), 4).tolist() == [2, 2, 2, 2]
    assert group_counts(np.array([0.625, 0.375]), 8).tolist() == [5, 3]


@pytest.mark.parametrize(("target", "lam", "allocation", "fragment"), [
    (1.0, 0.0, "uniform", "[0, 1)"),
    (-0.1, 0.0, "uniform", "[0, 1)"),
    (0.7, 0.4, "scores", "too large"),
    (0.05, 0.08, "scores", "too large"),
    (0.4, 0.5, "owl", "2 x lambda"),
    (0.7, -0.01, "scores", ">= 0"),
    (0.5, 0.08, "random", "not one of"),
])
def test_bad_budgets_are_clear_errors(target, lam, allocation, fragment):
    with pytest.raises(LayershapError, match=None) as info:
        check_budget(target, lam, allocation)
    assert fragment in str(info.value)
