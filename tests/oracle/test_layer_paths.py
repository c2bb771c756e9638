"""The multimodal Gemma 3 layer path and Qwen2's sliding-window layers (``max_window_layers``), measured and
pruned against Hugging Face's own forwards."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import TINY_VOCAB, loss_with_layers_deleted, make_tiny_tokenizer, tiny_config

from layershap.core.masks import masks_from_removed
from layershap.oracle.evaluate import MaskedEvaluator
from layershap.oracle.layers import find_layers, layer_types, skip_layers
from layershap.oracle.prune import save_pruned_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _windows(seed: int = 1, n: int = 3, length: int = 17) -> torch.Tensor:
    return torch.randint(3, TINY_VOCAB - 3, (n, length), generator=torch.Generator().manual_seed(seed))


def _scaled(model):
    with torch.no_grad():  # larger-than-default init so that skipping a layer visibly changes the loss
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.2)
    return model.eval()


def tiny_gemma3_multimodal(n_layers: int = 5, seed: int = 0):
    """Gemma3ForConditionalGeneration: the tiny Gemma 3 text model plus a SigLIP vision tower with as many
    layers, so the wrong ModuleList would have the right length."""
    import transformers as tf

    vision = tf.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=n_layers,
                                   num_attention_heads=2, image_size=32, patch_size=8)
    config = tf.Gemma3Config(text_config=tiny_config("gemma3", n_layers).to_dict(), vision_config=vision.to_dict(),
                             mm_tokens_per_image=4, image_token_index=TINY_VOCAB - 1, boi_token_index=TINY_VOCAB - 2,
                             eoi_token_index=TINY_VOCAB - 3)
    torch.manual_seed(seed)
    return _scaled(tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32))


def tiny_qwen2_sliding(n_layers: int = 5, seed: int = 0):
    """Qwen2 with sliding-window attention (window 4) from layer max_window_layers=2 on."""
    import transformers as tf

    config = tf.Qwen2Config(vocab_size=TINY_VOCAB, num_hidden_layers=n_layers, num_attention_heads=2, hidden_size=32,
                            intermediate_size=64, num_key_value_heads=1, max_position_embeddings=256,
                            use_sliding_window=True, sliding_window=4, max_window_layers=2)
    torch.manual_seed(seed)
    return _scaled(tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32))


def _masks(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.vstack([np.ones((1, n), bool), np.zeros((1, n), bool), rng.random((5, n)) < 0.6])


@pytest.mark.parametrize("build", [tiny_gemma3_multimodal, tiny_qwen2_sliding])
def test_masked_loss_equals_loss_with_layers_deleted(build):
    model = build()
    windows = _windows()
    masks = _masks(5)
    reference = np.array([loss_with_layers_deleted(model, windows, np.flatnonzero(~m)) for m in masks])
    assert np.ptp(reference) > 0.1
    for opts in ({}, {"prefix_sharing": False}):
        np.testing.assert_allclose(MaskedEvaluator(model, windows, **opts).nll(masks), reference, rtol=0, atol=2e-5)


def test_gemma3_multimodal_layers_are_the_language_model_s():
    model = tiny_gemma3_multimodal()
    handle = find_layers(model)
    assert handle.layers is model.model.language_model.layers
    assert handle.layers is not model.model.vision_tower.encoder.layers
    assert layer_types(model) == ["sliding_attention", "full_attention"] * 2 + ["sliding_attention"]


def test_gemma3_multimodal_prunes_the_text_layers_only(tmp_path):
    from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

    model = tiny_gemma3_multimodal()
    mask = masks_from_removed([1, 2], 5)[0]
    ids = _windows(seed=2, n=2, length=12)
    with torch.inference_mode(), skip_layers(model, mask):
        expected = model(input_ids=ids, use_cache=False).logits
    out = save_pruned_model(copy.deepcopy(model), make_tiny_tokenizer(), mask, tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert isinstance(reloaded, Gemma3ForConditionalGeneration)
    assert reloaded.config.text_config.num_hidden_layers == 3
    assert reloaded.config.text_config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert len(reloaded.model.vision_tower.encoder.layers) == 5  # the vision tower is untouched
    with torch.inference_mode():
        got = reloaded(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 2}
    with torch.inference_mode():
        cached = reloaded.generate(ids[:1, :9], use_cache=True, **kw)
        uncached = reloaded.generate(ids[:1, :9], use_cache=False, **kw)
    assert cached.shape == (1, 15) and torch.equal(cached, uncached)


@pytest.mark.parametrize("removed", [[1, 3], [0, 1], [2, 3, 4]])
def test_qwen2_pruning_keeps_which_layers_slide(removed, tmp_path):
    """Layers >= max_window_layers slide; after pruning every kept layer keeps its own attention, through the
    saved layer_types and through max_window_layers alone (the config rebuilt without layer_types)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    model = tiny_qwen2_sliding()
    full = layer_types(model)
    assert full == ["full_attention"] * 2 + ["sliding_attention"] * 3
    mask = masks_from_removed(removed, 5)[0]
    kept = [i for i in range(5) if i not in removed]
    ids = _windows(seed=2, n=2, length=12)
    with torch.inference_mode(), skip_layers(model, mask):
        expected = model(input_ids=ids, use_cache=False).logits
    out = save_pruned_model(copy.deepcopy(model), make_tiny_tokenizer(), mask, tmp_path / "pruned")
    saved = json.loads((out / "config.json").read_text())
    assert saved["max_window_layers"] == sum(1 for i in kept if i < 2)
    rebuilt = Qwen2Config(**{k: v for k, v in saved.items() if k != "layer_types"})
    assert rebuilt.layer_types == [full[i] for i in kept]
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert layer_types(reloaded) == [full[i] for i in kept]
    assert [layer.self_attn.sliding_window for layer in reloaded.model.layers] == [
        4 if full[i] == "sliding_attention" else None for i in kept]
    with torch.inference_mode():
        got = reloaded(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # the window matters here: the same kept layers without sliding windows compute something else
    unwindowed = copy.deepcopy(reloaded)
    for layer in unwindowed.model.layers:
        layer.self_attn.sliding_window = None
    unwindowed.config.layer_types = ["full_attention"] * len(kept)
    if "sliding_attention" in [full[i] for i in kept]:
        with torch.inference_mode():
            assert not torch.allclose(unwindowed(input_ids=ids, use_cache=False).logits, got, atol=1e-4)
