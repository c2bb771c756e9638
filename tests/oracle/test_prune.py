"""Pruned models saved and reloaded compute exactly what the masked in-memory model computes, and generate."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from transformers import AutoModelForCausalLM

from layershap.core.errors import MaskError
from layershap.core.masks import masks_from_removed
from layershap.oracle.layers import find_layers, layer_types, skip_layers
from layershap.oracle.prune import PRUNE_INFO_FILE, prune_model, save_pruned_model

PRUNE_ARCHS = ["llama", "gemma3", "gpt2", "opt", "qwen3", "gemma2", "gpt_neox", "phi3", "mistral", "qwen2"]


def _ids(seed: int = 0, length: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (2, length), generator=g)


@pytest.mark.parametrize("arch", PRUNE_ARCHS)
def test_reloaded_pruned_model_matches_masked_model(arch, tmp_path):
    model = make_tiny_model(arch, n_layers=5, seed=1)
    mask = masks_from_removed([1, 2], 5)[0]  # keeps 0, 3, 4: kept gemma layers change position and parity
    ids = _ids()
    with torch.inference_mode(), skip_layers(model, mask):
        expected = model(input_ids=ids, use_cache=False).logits
    full_types = layer_types(model)
    out = save_pruned_model(copy.deepcopy(model), make_tiny_tokenizer(), mask, tmp_path / "pruned",
                            {"model_id": "tiny"})
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert find_layers(reloaded).n_layers == 3
    assert reloaded.config.num_hidden_layers == 3
    # each kept layer keeps its own attention type
    assert layer_types(reloaded) == [full_types[i] for i in (0, 3, 4)]
    with torch.inference_mode():
        got = reloaded(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    info = json.loads((out / PRUNE_INFO_FILE).read_text())
    assert info["removed_layers"] == [1, 2] and info["kept_layers"] == [0, 3, 4] and info["model_id"] == "tiny"


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "opt"])
def test_reloaded_pruned_model_generates_with_cache(arch, tmp_path):
    """Greedy decoding with the KV cache equals decoding without it: the renumbered cache indices are right."""
    model = make_tiny_model(arch, n_layers=4, seed=2)
    tok = make_tiny_tokenizer()
    out = save_pruned_model(model, tok, masks_from_removed([0, 2], 4)[0], tmp_path / "p")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    attn_idx = [m.layer_idx for m in reloaded.modules() if hasattr(m, "layer_idx") and m is not reloaded]
    assert sorted(set(attn_idx)) == [0, 1]
    prompt = _ids(3, 9)[:1]
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.inference_mode():
        cached = reloaded.generate(prompt, use_cache=True, **kw)
        uncached = reloaded.generate(prompt, use_cache=False, **kw)
    assert cached.shape == (1, 15)
    assert torch.equal(cached, uncached)


def test_prune_model_in_place_renumbers_layers():
    model = make_tiny_model("gemma3", n_layers=6, seed=0)
    originals = list(find_layers(model).layers)
    types = layer_types(model)
    prune_model(model, masks_from_removed([0, 4], 6)[0])
    kept = find_layers(model).layers
    assert [id(m) for m in kept] == [id(originals[i]) for i in (1, 2, 3, 5)]
    assert [layer.self_attn.layer_idx for layer in kept] == [0, 1, 2, 3]
    assert model.config.layer_types == [types[i] for i in (1, 2, 3, 5)]
    assert model.config.num_hidden_layers == 4


def test_mask_and_output_errors(tmp_path):
    with pytest.raises(MaskError, match="out of range"):
        masks_from_removed([4], 4)[0]
    with pytest.raises(MaskError, match="duplicates"):
        masks_from_removed([1, 1], 4)[0]
    model = make_tiny_model("llama", n_layers=2)
    with pytest.raises(MaskError, match="keep at least one"):
        prune_model(model, np.zeros(2, bool))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(MaskError, match="non-empty directory"):
        save_pruned_model(model, None, np.array([True, False]), busy)
    assert (busy / "notes.txt").read_text() == "keep me"
    assert find_layers(model).n_layers == 2  # refused before anything was changed


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "opt"])
def test_in_memory_pruned_model_generates_with_cache(arch):
    """After in-place pruning (no reload), cached greedy decoding equals uncached: cache indices were renumbered."""
    model = make_tiny_model(arch, n_layers=4, seed=3)
    prune_model(model, masks_from_removed([0, 1], 4)[0])
    prompt = _ids(4, 9)[:1]
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 2}
    with torch.inference_mode():
        cached = model.generate(prompt, use_cache=True, **kw)
        uncached = model.generate(prompt, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
