"""Per-window losses and the KL utility of the masked evaluator, against independent computations: full-logit
forwards of copies of the model with the layers deleted."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import make_tiny_model

from layershap.core.errors import LayershapError
from layershap.core.masks import masks_from_removed
from layershap.oracle.evaluate import MaskedEvaluator

N = 4


def deleted_copy(model, removed):
    m = copy.deepcopy(model)
    m.model.layers = torch.nn.ModuleList([layer for i, layer in enumerate(m.model.layers) if i not in removed])
    m.config.num_hidden_layers = len(m.model.layers)
    if getattr(m.config, "layer_types", None) is not None:
        m.config.layer_types = [t for i, t in enumerate(m.config.layer_types) if i not in removed]
    return m


def full_log_probs(model, windows) -> torch.Tensor:
    """log p(next token) over the whole vocabulary, [W, L-1, V], from a plain forward (softcap by HF itself)."""
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(windows), use_cache=False).logits[:, :-1].double()
    return torch.log_softmax(logits, dim=-1)


@pytest.fixture(scope="module")
def setup(one_thread):
    model = make_tiny_model("gemma3", N, seed=3)  # Gemma 3: final-logit soft-capping and mixed attention types
    windows = np.random.default_rng(0).integers(0, 320, size=(3, 12))
    return model, windows


SETS = [(), (1,), (0, 2), (3,), (1, 2, 3)]


def test_per_window_nll_equals_the_deleted_copy_window_by_window(setup):
    model, windows = setup
    measured = MaskedEvaluator(model, windows, batch_size=2).measure(masks_from_removed(SETS, N))
    assert measured.nll.shape == (len(SETS), 3) and measured.kl is None
    for row, removed in enumerate(SETS):
        logp = full_log_probs(deleted_copy(model, removed), windows)
        target = torch.as_tensor(windows[:, 1:])[..., None]
        expected = (-logp.gather(2, target)[..., 0]).mean(dim=1).numpy()  # per-window mean NLL
        np.testing.assert_allclose(measured.nll[row], expected, rtol=0, atol=2e-5)
    np.testing.assert_allclose(measured.loss("nll"), measured.nll.mean(axis=1))


@pytest.mark.parametrize("prefix_sharing", [True, False])
def test_kl_with_the_whole_vocabulary_is_the_exact_divergence(setup, prefix_sharing):
    model, windows = setup
    ev = MaskedEvaluator(model, windows, batch_size=2, utility="kl", top_k=320, prefix_sharing=prefix_sharing)
    measured = ev.measure(masks_from_removed(SETS, N))
    dense = full_log_probs(model, windows)
    for row, removed in enumerate(SETS):
        masked = full_log_probs(deleted_copy(model, removed), windows)
        kl = (dense.exp() * (dense - masked)).sum(-1).mean(dim=1).numpy()  # per window
        np.testing.assert_allclose(measured.kl[row], kl, rtol=1e-4, atol=2e-5)
    assert measured.kl[0].max() == 0.0  # the full model against itself: the same numbers on both sides
    np.testing.assert_allclose(ev.loss(masks_from_removed(SETS, N)), measured.kl.mean(axis=1))


def test_top_k_kl_is_a_close_lower_bound(setup):
    model, windows = setup
    masks = masks_from_removed(SETS[1:], N)
    exact = MaskedEvaluator(model, windows, utility="kl", top_k=320).loss(masks)
    truncated = {k: MaskedEvaluator(model, windows, utility="kl", top_k=k).loss(masks) for k in (8, 64, 319)}
    for values in truncated.values():
        assert (values <= exact + 1e-6).all()  # merging the tail into one outcome never raises a KL
        assert (values > 0).all()
    assert (truncated[8] <= truncated[64] + 1e-6).all()  # a finer split of the tail, a larger divergence
    np.testing.assert_allclose(truncated[319], exact, rtol=1e-4)  # a one-token tail is no approximation


def test_kl_options_are_checked(setup):
    model, windows = setup
    with pytest.raises(LayershapError, match="unknown utility"):
        MaskedEvaluator(model, windows, utility="ppl")
    with pytest.raises(LayershapError, match="top_k must be >= 1"):
        MaskedEvaluator(model, windows, utility="kl", top_k=0)
    # more than the vocabulary keeps it whole: the exact divergence, as with top_k = vocabulary
    wide = MaskedEvaluator(model, windows, utility="kl", top_k=10_000)
    assert wide.top_k == 320
    masks = np.array([[True, False, True, True]])
    np.testing.assert_allclose(wide.loss(masks), MaskedEvaluator(model, windows, utility="kl", top_k=320).loss(masks),
                               rtol=1e-12)
    with pytest.raises(LayershapError, match="linear output head"):
        MaskedEvaluator(model, windows, utility="kl", token_chunk=4)
