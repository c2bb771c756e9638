"""Healing fits equal independent least-squares computations, and the healed model equals the pruned model with
the fitted patch applied by hand (hooks on a copy whose layers were deleted)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import make_tiny_model

from layershap.core.errors import LayershapError
from layershap.oracle.layers import find_layers
from layershap.pruning.heal import (
    DEFAULT_RIDGE,
    apply_healing,
    fit_healing,
    healing_applied,
    parse_method,
    removed_spans,
)

BRANCH = {"llama": "mlp", "gemma3": "post_feedforward_layernorm"}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _windows(n: int = 8, length: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (n, length), generator=g)
    ids[:, 0] = 0  # a BOS column, left out of the fit
    return ids


def _ids(seed: int = 5) -> torch.Tensor:
    return torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(seed))


def _activations(model, ids, carrier: int, end: int, branch: str) -> tuple[np.ndarray, np.ndarray]:
    """Branch output M of the carrier layer and span update D = L_end - L_carrier, by the test's own hooks
    (BOS position dropped), float64."""
    layers = find_layers(model).layers
    seen = {}
    hooks = [getattr(layers[carrier], branch).register_forward_hook(lambda m, a, o: seen.__setitem__("M", o)),
             layers[carrier].register_forward_hook(lambda m, a, o: seen.__setitem__("L", o)),
             layers[end].register_forward_hook(lambda m, a, o: seen.__setitem__("E", o))]
    ms, ds = [], []
    with torch.no_grad():
        for row in ids:
            model(input_ids=row[None], use_cache=False)
            ms.append(seen["M"][0, 1:].double().numpy())
            ds.append((seen["E"] - seen["L"])[0, 1:].double().numpy())
    for h in hooks:
        h.remove()
    return np.concatenate(ms), np.concatenate(ds)


def _ridge(m: np.ndarray, d: np.ndarray, ridge: float) -> np.ndarray:
    g = m.T @ m
    return np.linalg.solve(g + ridge * np.trace(g) / g.shape[0] * np.eye(g.shape[0]), m.T @ d)


def test_method_and_span_parsing():
    assert parse_method("bias") == ("bias", None)
    assert parse_method("lowrank:16") == ("lowrank", 16)
    assert removed_spans([7, 8, 9, 12, 16], 18) == [(7, 10), (12, 13), (16, 17)]
    assert removed_spans([16, 17], 18) == [(16, 18)]
    with pytest.raises(LayershapError, match="use bias, linear, lowrank:R"):
        parse_method("ridge")
    with pytest.raises(LayershapError, match="at least 1"):
        parse_method("lowrank:0")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_fits_equal_independent_least_squares(arch):
    model = make_tiny_model(arch, n_layers=5, seed=1)
    win = _windows()
    m, d = _activations(model, win, carrier=1, end=3, branch=BRANCH[arch])
    bias = fit_healing(model, win, [2, 3], "bias", progress=False)
    np.testing.assert_allclose(bias.spans[0].bias, d.mean(0), rtol=1e-5, atol=1e-6)
    assert bias.n_tokens == m.shape[0] == 8 * 23
    linear = fit_healing(model, win, [2, 3], "linear", progress=False)
    expected = _ridge(m, d, DEFAULT_RIDGE)
    np.testing.assert_allclose(linear.spans[0].delta, expected, rtol=1e-4, atol=1e-5)
    explained = 1 - ((d - m @ expected) ** 2).sum() / (d ** 2).sum()
    assert linear.spans[0].explained == pytest.approx(explained, abs=1e-6)
    assert 0 < explained < 1
    # reduced-rank regression: the full fit's fitted updates projected onto their top-3 principal directions
    low = fit_healing(model, win, [2, 3], "lowrank:3", progress=False)
    top = np.linalg.svd(m @ expected, full_matrices=False)[2][:3].T
    np.testing.assert_allclose(low.spans[0].down @ low.spans[0].up, expected @ top @ top.T, rtol=1e-3, atol=1e-5)
    assert np.linalg.matrix_rank(low.spans[0].down @ low.spans[0].up) == 3
    assert bias.spans[0].explained < low.spans[0].explained < linear.spans[0].explained


@pytest.mark.parametrize(("arch", "method", "removed"), [
    ("llama", "linear", [1, 3, 4]), ("llama", "bias", [1, 3, 4]), ("gemma3", "lowrank:4", [1, 3, 4]),
    ("gemma3", "linear", [1, 3, 4]), ("llama", "linear", [1, 4, 5]), ("gemma3", "bias", [1, 4, 5])])
def test_healed_model_equals_pruned_model_patched_by_hand(arch, method, removed):
    """Two spans ({1} and {3, 4}, or {4, 5} at the model's end): the in-memory healed model (reversible and for
    good) equals a copy with the layers deleted and each fitted patch applied to the carrier's branch output by a
    hook."""
    model = make_tiny_model(arch, n_layers=6, seed=2)
    healing = fit_healing(model, _windows(), removed, method, progress=False)
    second = (removed[1], removed[2] + 1, removed[1] - 1)
    assert [(s.start, s.stop, s.carrier) for s in healing.spans] == [(1, 2, 0), second]
    reference = copy.deepcopy(model)
    handle = find_layers(reference)
    for span in healing.spans:
        full = span.delta if span.delta is not None else (
            span.down @ span.up if span.down is not None else np.zeros((32, 32), np.float32))
        shift = span.bias if span.bias is not None else np.zeros(32, np.float32)
        t, b = torch.from_numpy(full), torch.from_numpy(shift)
        getattr(handle.layers[span.carrier], BRANCH[arch]).register_forward_hook(
            lambda mod, args, out, t=t, b=b: out + out @ t + b)
    kept = [i for i in range(6) if i not in removed]
    handle.parent.layers = torch.nn.ModuleList([handle.layers[i] for i in kept])
    reference.config.num_hidden_layers = 3
    if getattr(reference.config, "layer_types", None) is not None:
        reference.config.layer_types = [reference.config.layer_types[i] for i in kept]
    ids = _ids()
    with torch.no_grad():
        expected = reference(input_ids=ids, use_cache=False).logits
        unhealed = model(input_ids=ids, use_cache=False).logits  # dense, for the "patches restored" check
        with healing_applied(model, healing):
            got = model(input_ids=ids, use_cache=False).logits
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, unhealed)  # left as it was
        healed = apply_healing(copy.deepcopy(model), healing)
        for_good = healed(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(for_good, expected, rtol=0, atol=1e-5)
    assert healed.config.num_hidden_layers == 3


def test_fit_errors_say_what_to_change():
    model = make_tiny_model("llama", n_layers=4, seed=0)
    win = _windows()
    with pytest.raises(LayershapError, match="keep layer 0"):
        fit_healing(model, win, [0, 1], "bias", progress=False)
    with pytest.raises(LayershapError, match="below the hidden size 32"):
        fit_healing(model, win, [2], "lowrank:32", progress=False)
    few = _windows(2, 9)  # 2 x 8 tokens after BOS
    with pytest.raises(LayershapError, match="16 calibration tokens cannot determine a 32 x 32"):
        fit_healing(model, few, [2], "linear", progress=False)
    with pytest.raises(LayershapError, match="too few for rank 20"):
        fit_healing(model, few, [2], "lowrank:20", progress=False)
    with pytest.raises(LayershapError, match="singular system"):
        fit_healing(model, few, [2], "lowrank:4", ridge=0.0, progress=False)
    with pytest.raises(LayershapError, match="healing supports model types"):
        fit_healing(make_tiny_model("gpt2", n_layers=3), win, [1], "bias", progress=False)
