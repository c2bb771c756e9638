"""Wanda/magnitude selection: sequential Wanda equals an independent layer-by-layer numpy reference; counted
zeros match the budgets per layer, per matrix and per row; N:M groups keep their largest scores."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from torch import nn

from layershap.oracle.layers import find_layers
from layershap.pruning.sparsify import decoder_linears, sparsify_layers
from layershap.pruning.wanda import apportion, select_unstructured


def _windows(n: int = 3, length: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 300, size=(n, length)).astype(np.int64)


def _reference_wanda(model: nn.Module, windows: np.ndarray, budgets: list[float]) -> nn.Module:
    """Wanda by the book, one full forward pass per layer: score on the inputs the already-pruned model gives."""
    ref = copy.deepcopy(model)
    ids = torch.as_tensor(windows)
    for i, layer in enumerate(find_layers(ref).layers):
        inputs: dict[str, list[np.ndarray]] = {}
        linears = [(n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
        hooks = [m.register_forward_pre_hook(
            lambda mod, args, name=n, inputs=inputs: inputs.setdefault(name, []).append(
                args[0].detach().double().reshape(-1, args[0].shape[-1]).numpy()))
            for n, m in linears]
        with torch.no_grad():
            ref(input_ids=ids, use_cache=False)
        for h in hooks:
            h.remove()
        for name, module in linears:
            x = np.concatenate(inputs[name])
            norm = np.sqrt((x ** 2).sum(axis=0))
            w = module.weight.detach().double().numpy()
            k = round(budgets[i] * w.shape[1])
            new = module.weight.detach().clone()
            for r in range(w.shape[0]):
                new[r, np.argsort(np.abs(w[r]) * norm)[:k]] = 0.0
            module.weight.data.copy_(new)
    return ref


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen3", "opt"])
def test_sequential_wanda_matches_reference(arch, one_thread):
    model = make_tiny_model(arch, n_layers=3, seed=4)
    windows = _windows()
    budgets = [0.25, 0.5, 0.75]  # whole numbers of weights per row for every tiny linear shape
    expected = _reference_wanda(model, windows, budgets)
    report = sparsify_layers(model, windows, np.array(budgets), method="wanda", progress=False)
    for got_layer, ref_layer in zip(decoder_linears(model), decoder_linears(expected)):
        for (name, got), (_, ref) in zip(got_layer, ref_layer):
            assert torch.equal(got.weight == 0, ref.weight == 0), name
            torch.testing.assert_close(got.weight, ref.weight, rtol=0, atol=0)
    assert [layer["sparsity"] for layer in report["layers"]] == budgets


def test_counted_zeros_match_uneven_budgets(one_thread):
    model = make_tiny_model("llama", n_layers=4, seed=5)
    budgets = np.array([0.61234, 0.70011, 0.79, 0.69755])  # mean 0.7; no budget is a whole number of weights
    report = sparsify_layers(model, _windows(seed=1), budgets, method="wanda", progress=False)
    linears = decoder_linears(model)
    sizes = np.array([sum(m.weight.numel() for _, m in layer) for layer in linears])
    zeros = np.array([sum(int((m.weight == 0).sum()) for _, m in layer) for layer in linears])
    assert zeros.sum() == round(0.7 * sizes.sum())                         # mean exactly the target
    assert np.all(np.abs(zeros - budgets * sizes) < 1.0)                   # each layer within one weight
    assert [x["pruned"] for x in report["layers"]] == zeros.tolist()
    for layer, budget in zip(linears, budgets):
        for _, m in layer:
            per_row = (m.weight == 0).sum(dim=1)
            assert int(per_row.max() - per_row.min()) <= 1                 # Wanda: same count in every row
            assert abs(int(per_row.sum()) - budget * m.weight.numel()) < 1.0 + 1e-9


def test_magnitude_prunes_smallest_of_each_matrix():
    model = make_tiny_model("llama", n_layers=2, seed=6)
    before = [[m.weight.detach().clone() for _, m in layer] for layer in decoder_linears(model)]
    sparsify_layers(model, None, np.array([0.5, 0.5]), method="magnitude", progress=False)
    for old_layer, layer in zip(before, decoder_linears(model)):
        for old, (_, m) in zip(old_layer, layer):
            pruned = m.weight == 0
            assert int(pruned.sum()) == old.numel() // 2
            assert old[pruned].abs().max() <= old[~pruned].abs().min()     # global threshold per matrix


def test_two_four_pattern_keeps_the_two_largest_scores_of_every_four(one_thread):
    model = make_tiny_model("llama", n_layers=2, seed=7)
    before = [[m.weight.detach().clone() for _, m in layer] for layer in decoder_linears(model)]
    report = sparsify_layers(model, None, np.array([0.5, 0.5]), method="magnitude", pattern="2:4",
                             progress=False)
    assert report["sparsity"] == 0.5
    for old_layer, layer in zip(before, decoder_linears(model)):
        for old, (_, m) in zip(old_layer, layer):
            pruned = (m.weight == 0).reshape(-1, 4)
            assert torch.all(pruned.sum(dim=1) == 2)
            magnitude = old.abs().reshape(-1, 4)
            largest_pruned = torch.where(pruned, magnitude, -1.0).max(dim=1).values
            smallest_kept = torch.where(pruned, np.inf, magnitude).min(dim=1).values
            assert torch.all(largest_pruned <= smallest_kept)


def test_mixed_n_of_8_wanda_follows_budgets(one_thread):
    model = make_tiny_model("llama", n_layers=2, seed=8)
    report = sparsify_layers(model, _windows(seed=3), np.array([0.375, 0.625]), method="wanda", pattern="4:8",
                             progress=False)
    assert report["counts"] == [3, 5]                                  # layer 0 prunes 3 of 8, layer 1 5 of 8
    for pruned_per_group, layer in zip((3, 5), decoder_linears(model)):
        for _, m in layer:
            assert torch.all((m.weight.reshape(-1, 8) == 0).sum(dim=1) == pruned_per_group)


def test_apportion_and_row_selection_closed_forms():
    assert apportion(np.array([2.5, 2.5, 1.0]), 6).tolist() == [3, 2, 1]
    assert apportion(np.full(4, 10 / 4), 10).tolist() == [3, 3, 2, 2]
    metric = torch.tensor([[5.0, 1.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    got = select_unstructured(metric, 5, per_row=True)                 # rows lose 2, 2, 1
    expected = torch.tensor([[0, 1, 0, 1], [1, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(got, expected)
    assert torch.equal(select_unstructured(metric, 3, per_row=False),
                       torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.bool))
