"""Healed models saved and reloaded compute what the healed in-memory model computes, and generate with the KV
cache: fused into ``down_proj`` (a standard folder) where exact, custom code through ``auto_map`` elsewhere."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from transformers import AutoModelForCausalLM

from layershap.oracle.layers import find_layers, layer_types
from layershap.oracle.prune import PRUNE_INFO_FILE, remote_code_option
from layershap.pruning.heal import apply_healing, fit_healing
from layershap.pruning.heal_save import save_healed_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"]
# what the saved folder must be: a standard architecture (fused) or layershap's custom code
FUSED = {("llama", "bias"), *((a, m) for a in ("llama", "mistral", "qwen2", "qwen3", "phi3")
                               for m in ("linear", "lowrank:4"))}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _windows() -> torch.Tensor:
    ids = torch.randint(3, 300, (8, 24), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 0
    return ids


def _ids(seed: int = 7, length: int = 12) -> torch.Tensor:
    return torch.randint(3, 300, (2, length), generator=torch.Generator().manual_seed(seed))


def _reload(out):
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **remote_code_option(out)).eval()


@pytest.mark.parametrize("method", ["bias", "linear", "lowrank:4"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_reloaded_healed_model_matches_in_memory_model(arch, method, tmp_path):
    model = make_tiny_model(arch, n_layers=6, seed=1)
    healing = fit_healing(model, _windows(), [1, 3, 4], method, progress=False)
    in_memory = apply_healing(copy.deepcopy(model), healing)
    out = save_healed_model(copy.deepcopy(model), make_tiny_tokenizer(), healing, tmp_path / "healed",
                            {"model_id": "tiny"})
    config = json.loads((out / "config.json").read_text())
    info = json.loads((out / PRUNE_INFO_FILE).read_text())
    fused = (arch, method) in FUSED
    assert ("auto_map" in config) is not fused and info["trust_remote_code"] is not fused
    assert info["healing"]["saved_form"] == ("fused" if fused else "custom code")
    assert info["removed_layers"] == [1, 3, 4] and info["healing"]["method"] == method
    reloaded = _reload(out)
    assert find_layers(reloaded).n_layers == 3
    assert layer_types(reloaded) == [layer_types(model)[i] for i in (0, 2, 5)]
    ids = _ids()
    with torch.no_grad():
        expected = in_memory(input_ids=ids, use_cache=False).logits
        got = reloaded(input_ids=ids, use_cache=False).logits
        pruned = copy.deepcopy(model)
        from layershap.oracle.prune import prune_model

        unhealed = prune_model(pruned, healing.mask)(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - unhealed).abs().max() > 1e-3  # the patches made it into the saved model
    if fused:  # plain transformers classes, no patch modules
        assert type(reloaded).__module__.startswith("transformers.models.")
        assert not any("layershap_heal" in k for k in reloaded.state_dict())


@pytest.mark.parametrize(("arch", "method"), [("llama", "linear"), ("llama", "bias"), ("qwen2", "bias"),
                                              ("gemma3", "linear"), ("gemma2", "lowrank:4")])
def test_reloaded_healed_model_generates_with_cache(arch, method, tmp_path):
    """Greedy decoding with the KV cache equals decoding without it (and the step-by-step full forward)."""
    model = make_tiny_model(arch, n_layers=5, seed=2)
    tok = make_tiny_tokenizer()
    healing = fit_healing(model, _windows(), [2, 3], method, progress=False)
    reloaded = _reload(save_healed_model(model, tok, healing, tmp_path / "h"))
    prompt = _ids(3, 9)[:1]
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        cached = reloaded.generate(prompt, use_cache=True, **kw)
        uncached = reloaded.generate(prompt, use_cache=False, **kw)
        seq = prompt
        for _ in range(6):  # by hand: argmax of the full forward
            nxt = reloaded(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert cached.shape == (1, 15)
    assert torch.equal(cached, uncached) and torch.equal(cached, seq)


def test_custom_code_refuses_without_trust_remote_code(tmp_path):
    model = make_tiny_model("gemma3", n_layers=4, seed=0)
    healing = fit_healing(model, _windows(), [2], "linear", progress=False)
    out = save_healed_model(model, None, healing, tmp_path / "h")
    assert remote_code_option(out) == {"trust_remote_code": True}
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(out)
    (out / "layershap_healed.py").write_text((out / "layershap_healed.py").read_text() + "\n# edited\n")
    with pytest.raises(ValueError, match="did not write"):
        remote_code_option(out)


def test_healed_custom_code_model_prunes_further_with_its_patches_renumbered(tmp_path):
    """Removing a layer before a patch's carrier from a reloaded healed model moves the patch with its layer:
    the re-saved model reloads equal to the masked healed model."""
    from layershap.core.masks import masks_from_removed
    from layershap.oracle.layers import skip_layers
    from layershap.oracle.prune import save_pruned_model

    model = make_tiny_model("gemma3", n_layers=6, seed=4)
    healing = fit_healing(model, _windows(), [3], "linear", progress=False)  # carrier 2, kept 0 1 2 4 5
    healed = _reload(save_healed_model(model, None, healing, tmp_path / "h"))
    assert list(healed.config.layershap_heal["patches"]) == ["2"]
    mask = masks_from_removed([0], 5)[0]
    ids = _ids()
    with torch.no_grad(), skip_layers(healed, mask):
        expected = healed(input_ids=ids, use_cache=False).logits
    again = _reload(save_pruned_model(healed, None, mask, tmp_path / "h2"))
    assert list(again.config.layershap_heal["patches"]) == ["1"]
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, use_cache=False).logits, expected, rtol=0, atol=1e-5)
