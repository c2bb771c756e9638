"""Models saved with attention / MLP sublayers removed: no weights for them, reloaded logits equal the masked
model's, and ``generate`` with the KV cache works (a layer without attention holds no cache)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from test_sublayers import reference_logits
from transformers import AutoModelForCausalLM

from layershap.core.errors import MaskError, UnsupportedModelError
from layershap.oracle.prune import PRUNE_INFO_FILE, remote_code_option, save_sublayer_pruned_model
from layershap.oracle.sublayers import skip_sublayers

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]
# 5 layers: layer 0 loses its attention, 1 is whole, 2 is deleted, 3 loses its MLP, 4 is whole
MASK = np.array([0, 1, 1, 1, 0, 0, 1, 0, 1, 1], bool)


def _ids(seed: int = 0, length: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (2, length), generator=g)


@pytest.mark.parametrize("arch", ARCHS)
def test_reloaded_sublayer_model_matches_masked_model(arch, tmp_path, one_thread):
    model = make_tiny_model(arch, n_layers=5, seed=1)
    ids = _ids()
    with torch.inference_mode(), skip_sublayers(model, MASK):
        masked = model(input_ids=ids, use_cache=False).logits
    reference = reference_logits(model, ids, MASK)
    torch.testing.assert_close(masked, reference, rtol=0, atol=1e-5)
    full_params = sum(p.numel() for p in model.parameters())
    layers = model.model.layers
    gone = sum(p.numel() for name in ("self_attn", "input_layernorm") for p in getattr(layers[0], name).parameters())
    gone += sum(p.numel() for p in layers[2].parameters())
    mlp_names = ("mlp", "post_attention_layernorm") if arch not in ("gemma2", "gemma3") else (
        "mlp", "pre_feedforward_layernorm", "post_feedforward_layernorm")
    gone += sum(p.numel() for name in mlp_names for p in getattr(layers[3], name).parameters())
    if arch in ("gemma2", "gemma3"):
        gone += sum(p.numel() for p in layers[0].post_attention_layernorm.parameters())

    out = save_sublayer_pruned_model(copy.deepcopy(model), make_tiny_tokenizer(), MASK, tmp_path / "p",
                                     {"model_id": "tiny"})
    assert remote_code_option(out) == {"trust_remote_code": True}
    with pytest.raises(ValueError):  # an unknown model_type without the custom code: refused, never a wrong model
        AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=True).eval()
    assert reloaded.config.num_hidden_layers == 4
    assert (reloaded.config.layershap_no_attention, reloaded.config.layershap_no_mlp) == ([0], [2])
    assert not hasattr(reloaded.model.layers[0], "self_attn") and not hasattr(reloaded.model.layers[2], "mlp")
    assert sum(p.numel() for p in reloaded.parameters()) == full_params - gone
    with torch.inference_mode():
        got = reloaded(input_ids=ids, use_cache=False).logits
    diff = float((got - masked).abs().max())
    assert diff == 0.0, diff  # the same modules run the same operations: bit-identical
    info = json.loads((out / PRUNE_INFO_FILE).read_text())
    assert info["removed_sublayers"] == ["0.attn", "2.attn", "2.mlp", "3.mlp"] and info["trust_remote_code"]
    assert (info["layers_without_attention"], info["layers_without_mlp"]) == ([0], [2])

    # generate with the KV cache: the same tokens as without it and as a greedy loop over the masked model
    tok = make_tiny_tokenizer()
    prompt = _ids(3, 9)[:1]
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.inference_mode():
        cached = reloaded.generate(prompt, use_cache=True, **kw)
        uncached = reloaded.generate(prompt, use_cache=False, **kw)
        seq = prompt
        with skip_sublayers(model, MASK):
            for _ in range(6):
                nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], dim=1)
        step = reloaded(input_ids=prompt, use_cache=True)
    assert cached.shape == (1, 15)
    assert torch.equal(cached, uncached) and torch.equal(cached, seq)
    cache = step.cache if hasattr(step, "cache") else step.past_key_values
    assert type(cache.layers[0]).__name__ == "DummyLayer"  # no attention, no cache
    assert cache.layers[1].keys.shape[-2] == 9


def test_only_whole_blocks_give_a_standard_folder(tmp_path, one_thread):
    model = make_tiny_model("llama", n_layers=4, seed=1)
    mask = np.array([1, 1, 0, 0, 1, 1, 1, 1], bool)  # layer 1 whole
    ids = _ids()
    with torch.inference_mode(), skip_sublayers(model, mask):
        masked = model(input_ids=ids, use_cache=False).logits
    out = save_sublayer_pruned_model(model, None, mask, tmp_path / "p")
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    assert not (out / "sublayer_model.py").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(input_ids=ids, use_cache=False).logits, masked, rtol=0, atol=1e-5)
    assert json.loads((out / PRUNE_INFO_FILE).read_text())["removed_sublayers"] == ["1.attn", "1.mlp"]


def test_sublayer_prune_refusals(tmp_path):
    with pytest.raises(MaskError, match="removes every decoder layer"):
        save_sublayer_pruned_model(make_tiny_model("llama", 2), None, np.zeros(4, bool), tmp_path / "a")
    with pytest.raises(MaskError, match="mask length 4"):
        save_sublayer_pruned_model(make_tiny_model("llama", 4), None, np.ones(4, bool), tmp_path / "b")
    with pytest.raises(UnsupportedModelError, match="sublayers supports"):
        save_sublayer_pruned_model(make_tiny_model("gpt2", 2), None, np.ones(4, bool), tmp_path / "c")
