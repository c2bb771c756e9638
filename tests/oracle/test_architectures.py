"""State-space, RWKV and hybrid decoders: the oracle's masked loss equals the loss of a copy of the model with
those layers deleted, and pruned models save, reload with plain ``from_pretrained`` and generate.

The references are written here from the architectures' own definitions (read off transformers' modeling code),
not from layershap's: a deep copy loses the removed layers from its ``ModuleList`` and gets whatever its decoder
loop needs to run the rest as they ran in the full model.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import RECURRENT_ARCHS, TINY_VOCAB, make_tiny_model, make_tiny_tokenizer
from transformers import AutoModelForCausalLM

from layershap.core.errors import UnsupportedModelError
from layershap.core.masks import masks_from_removed
from layershap.oracle.evaluate import MaskedEvaluator
from layershap.oracle.layers import find_layers, layer_types, skip_layers
from layershap.oracle.prune import PRUNE_INFO_FILE, save_pruned_model

pytestmark = pytest.mark.usefixtures("one_thread")

N_LAYERS = 7
# Where each architecture keeps its blocks, written out independently of the library.
PATHS = {"mamba": "backbone.layers", "mamba2": "backbone.layers", "falcon_mamba": "backbone.layers",
         "rwkv": "rwkv.blocks"}


def _windows(seed: int = 1, n: int = 3, length: int = 17) -> torch.Tensor:
    return torch.randint(3, TINY_VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _blocks(model):
    parent_path, attr = PATHS.get(model.config.model_type, "model.layers").rsplit(".", 1)
    parent = model
    for part in parent_path.split("."):
        parent = getattr(parent, part)
    return parent, attr


def deleted_copy(model, removed, *, rwkv_rescaling: bool = False):
    """A deep copy of ``model`` without the ``removed`` layers, its config and layers told what they need.

    RWKV: block 0's ``pre_ln`` is the embedding norm and stays (the new first block applies it); without
    ``rwkv_rescaling`` the copy runs without the inference-time rescaling (``rescale_every=0``, the weights'
    own function), with it the copy rescales by its new block positions, as a reloaded pruned model does.
    """
    m = copy.deepcopy(model)
    config = m.config
    parent, attr = _blocks(m)
    old = list(getattr(parent, attr))
    gone = {int(i) for i in removed}
    kept = [i for i in range(len(old)) if i not in gone]
    new = [old[i] for i in kept]
    kind = config.model_type
    if kind == "rwkv":
        assert not m.rwkv.layers_are_rescaled  # a copy of weights never rescaled in place
        if new and 0 in gone:
            new[0].pre_ln = old[0].pre_ln
        for position, block in enumerate(new):
            block.layer_id = position  # block 0 applies pre_ln
        if not rwkv_rescaling:
            config.rescale_every = 0
    elif kind == "jamba":  # the decoder loop picks each layer's mask by config.layer_types[i]
        types = [config.layer_types[i] for i in kept]
        config.__class__ = type("KeptJambaConfig", (type(config),), {"layer_types": property(lambda s: types)})
    elif kind == "bamba":
        attention = set(config.attn_layer_indices)
        config.attn_layer_indices = [p for p, i in enumerate(kept) if i in attention]
    elif kind == "zamba2":  # a hybrid layer picks its adapters by the position the loop passes: map it back
        hybrids = [i for i, t in enumerate(config.layers_block_type) if t == "hybrid"]
        for position, i in enumerate(kept):
            if i in hybrids:
                shared = old[i].shared_transformer
                shared.self_attn.layer_dic = {position: hybrids.index(i)}
                shared.feed_forward.layer_dic = {position: hybrids.index(i)}
    config.num_hidden_layers = len(new)
    setattr(parent, attr, torch.nn.ModuleList(new))
    return m, old


def reference_nll(model, ids, removed) -> float:
    """HF's causal-LM loss (``labels=``) of the deleted copy; RWKV without any block: its embedding norm, final
    norm and head, computed directly."""
    m, old = deleted_copy(model, removed)
    ids = torch.as_tensor(ids)
    with torch.no_grad():
        if m.config.model_type == "rwkv" and len(removed) == len(old):
            hidden = m.rwkv.ln_out(old[0].pre_ln(m.rwkv.embeddings(ids)))
            logits = m.head(hidden)[:, :-1]
            return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))
        return float(m(input_ids=ids, labels=ids, use_cache=False).loss)


def _masks(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rand = rng.random((5, n)) < 0.6
    first_gone = np.ones((1, n), bool)
    first_gone[0, 0] = False
    return np.vstack([np.ones((1, n), bool), np.zeros((1, n), bool), first_gone, rand])


@pytest.mark.parametrize("arch", RECURRENT_ARCHS)
def test_masked_loss_equals_loss_with_layers_deleted(arch):
    model = make_tiny_model(arch, N_LAYERS, seed=0)
    if arch in ("jamba", "bamba", "zamba2"):
        # eager attention takes the 4-D causal mask, a Mamba layer none: a layer handed the other type's mask
        # computes something else (with SDPA both masks are None on unpadded windows)
        model.set_attn_implementation("eager")
    reference_model = copy.deepcopy(model)  # never run by the oracle (RWKV rescales its weights in place)
    windows = _windows()
    masks = _masks(N_LAYERS)
    reference = np.array([reference_nll(reference_model, windows, np.flatnonzero(~m)) for m in masks])
    assert np.ptp(reference) > 0.05  # the masks really change the loss
    slot = MaskedEvaluator(model, windows).slot_bytes
    for opts in ({}, {"prefix_sharing": False}, {"cache_mb": slot / 2**20}, {"token_chunk": 13, "batch_size": 2}):
        got = MaskedEvaluator(model, windows, **opts).nll(masks)
        np.testing.assert_allclose(got, reference, rtol=0, atol=2e-5, err_msg=f"{arch} {opts}")
    expected = ["linear_attention"] * N_LAYERS if arch == "rwkv" else list(model.config.layer_types)
    assert layer_types(model) == expected


def test_rwkv_oracle_runs_the_unrescaled_blocks():
    """RWKV's inference-time rescaling (weights / 2**(block // rescale_every), hidden halved every rescale_every
    blocks) changes the loss only through the layer norms' epsilon: the oracle measures the weights' own function,
    within 1e-4 of the rescaled forward, and leaves the model as it found it."""
    model = make_tiny_model("rwkv", N_LAYERS, seed=0)
    windows = _windows()
    with torch.no_grad():
        rescaled = float(model(input_ids=windows, labels=windows, use_cache=False).loss)
    assert model.rwkv.layers_are_rescaled
    ev = MaskedEvaluator(model, windows)
    unrescaled = ev.nll(np.ones((1, N_LAYERS), bool))[0]
    assert unrescaled == pytest.approx(reference_nll(make_tiny_model("rwkv", N_LAYERS, seed=0), windows, []),
                                       abs=2e-5)
    assert unrescaled == pytest.approx(rescaled, abs=1e-4)
    with torch.no_grad():  # a plain forward afterwards rescales again and gives the same loss as before
        assert float(model(input_ids=windows, labels=windows, use_cache=False).loss) == pytest.approx(rescaled,
                                                                                                         abs=1e-6)


def test_mamba_bfloat16_keeps_float32_residuals_within_the_cache_budget():
    """Mamba blocks return float32 residuals (residual_in_fp32) in a bfloat16 model: the prefix cache counts
    them at 4 bytes and the head gets them in its own dtype, as Mamba's forward casts them."""
    model = make_tiny_model("mamba", N_LAYERS, seed=0).to(torch.bfloat16)
    windows = _windows()
    masks = _masks(N_LAYERS)
    reference = np.array([reference_nll(model, windows, np.flatnonzero(~m)) for m in masks])
    ev = MaskedEvaluator(model, windows, cache_mb=2 * 3 * 17 * 32 * 4 / 2**20)  # two float32 slots
    assert ev.slot_bytes == 3 * 17 * 32 * 4
    np.testing.assert_allclose(ev.nll(masks), reference, rtol=0, atol=2e-2)
    assert 0 < ev.last_stats["peak_cache_bytes"] <= 2 * ev.slot_bytes


# Removal sets that move each architecture's per-layer structure: RWKV loses block 0 (pre_ln moves, rescaling
# positions shift); Jamba {0, 1} keeps a pattern the period/offset formulas give, {1} one they do not (custom
# code); Zamba2 (hybrids at 1, 2, 4, 5 on shared blocks 0, 1, 0, 1): {4} keeps blocks 0, 1, 1 (three blocks, one
# duplicated), {1} keeps 1, 0, 1 (the cycle starts at block 1), {0, 3} keeps every hybrid.
PRUNE_CASES = [("mamba", [0, 2]), ("mamba2", [1, 5]), ("falcon_mamba", [0, 6]), ("rwkv", [0, 2]),
               ("rwkv", [3]), ("jamba", [0, 1]), ("jamba", [1]), ("bamba", [1, 2]), ("zamba2", [4]),
               ("zamba2", [1]), ("zamba2", [0, 3])]


@pytest.mark.parametrize("arch, removed", PRUNE_CASES)
def test_pruned_model_reloads_and_generates(arch, removed, tmp_path):
    model = make_tiny_model(arch, N_LAYERS, seed=1)
    reference_model = copy.deepcopy(model)
    mask = masks_from_removed(removed, N_LAYERS)[0]
    ids = _windows(seed=2, n=2, length=12)
    with torch.inference_mode():
        with skip_layers(model, mask):
            masked = model(input_ids=ids, use_cache=False).logits
        model(input_ids=ids, use_cache=False)  # a plain forward: RWKV rescales its weights for inference
    full_types = layer_types(model)
    pruned = copy.deepcopy(model)
    out = save_pruned_model(pruned, make_tiny_tokenizer(), mask, tmp_path / "pruned")
    info = json.loads((out / PRUNE_INFO_FILE).read_text())
    remote = info["trust_remote_code"]
    assert remote == (arch == "jamba" and removed == [1])
    if remote:  # the standard Jamba config cannot say which layers are attention/MoE now: refuse, never guess
        with pytest.raises(ValueError, match="trust_remote_code"):
            AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=remote).eval()
    kept = [i for i in range(N_LAYERS) if i not in removed]
    assert find_layers(reloaded).n_layers == len(kept) == reloaded.config.num_hidden_layers
    assert layer_types(reloaded) == [full_types[i] for i in kept]
    with torch.inference_mode():
        got = reloaded(input_ids=ids, use_cache=False).logits
        in_memory = pruned(input_ids=ids, use_cache=False).logits
        reference_copy, _ = deleted_copy(reference_model, removed, rwkv_rescaling=True)
        reference = reference_copy.eval()(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, in_memory, rtol=0, atol=0)
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-5)
    # the masked model runs the same layers; RWKV's masked pass runs them unrescaled (see the test above)
    torch.testing.assert_close(got, masked, rtol=0, atol=1e-3 if arch == "rwkv" else 1e-5)
    prompt = ids[:1, :7]
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 2}
    with torch.inference_mode():
        cached = reloaded.generate(prompt, use_cache=True, **kw)
        uncached = reloaded.generate(prompt, use_cache=False, **kw)
    assert cached.shape == (1, 13)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("removed, blocks, kept_hybrids", [([4], 3, [1, 2, 5]), ([1], 2, [2, 4, 5])])
def test_zamba2_pruning_rebuilds_the_shared_block_cycle(removed, blocks, kept_hybrids, tmp_path):
    """Kept hybrids on shared blocks 0, 1, 1 need three blocks; on 1, 0, 1 two (starting at block 1): the pruned
    config says so, the reloaded model ties hybrid k to hybrid k mod blocks, and each hybrid keeps its original
    block's weights and its own adapter."""
    model = make_tiny_model("zamba2", N_LAYERS, seed=1)
    pruned = copy.deepcopy(model)
    out = save_pruned_model(pruned, None, masks_from_removed(removed, N_LAYERS)[0], tmp_path / "p")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert reloaded.config.num_mem_blocks == blocks
    # the in-memory model's tie map is the one transformers derives for the pruned config
    assert pruned.all_tied_weights_keys == reloaded.all_tied_weights_keys
    hybrids = [layer for layer in reloaded.model.layers if hasattr(layer, "shared_transformer")]
    for k, (layer, original) in enumerate(zip(hybrids, kept_hybrids, strict=True)):
        shared, source = layer.shared_transformer, model.model.layers[original].shared_transformer
        torch.testing.assert_close(shared.self_attn.q_proj.weight, source.self_attn.q_proj.weight, rtol=0, atol=0)
        ordinal = [1, 2, 4, 5].index(original)  # the hybrid's ordinal in the full model
        torch.testing.assert_close(shared.feed_forward.gate_up_proj_adapter_list[k][0].weight,
                                   source.feed_forward.gate_up_proj_adapter_list[ordinal][0].weight, rtol=0, atol=0)
        if k >= blocks:  # tied to the first hybrid of its block
            assert shared.self_attn.q_proj.weight is hybrids[k % blocks].shared_transformer.self_attn.q_proj.weight


def test_generic_discovery_and_clear_refusal():
    """A decoder whose model type has no entry is found by its one ModuleList of num_hidden_layers blocks; one
    whose config describes individual layers (GPT-Neo's local/global attention_layers) is refused by name."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.GemmaConfig(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config).eval()
    windows = _windows()
    with pytest.warns(UserWarning, match="found at model.layers"):
        handle = find_layers(model)
    assert handle.layers is model.model.layers
    reference = []
    for removed in ([], [1], [0, 3]):
        m = copy.deepcopy(model)
        m.model.layers = torch.nn.ModuleList([x for i, x in enumerate(m.model.layers) if i not in removed])
        m.config.num_hidden_layers = len(m.model.layers)
        with torch.no_grad():
            reference.append(float(m(input_ids=windows, labels=windows, use_cache=False).loss))
    got = MaskedEvaluator(model, windows).nll(np.array([[1, 1, 1, 1], [1, 0, 1, 1], [0, 1, 1, 0]], bool))
    np.testing.assert_allclose(got, reference, rtol=0, atol=2e-5)

    neo = AutoModelForCausalLM.from_config(tf.GPTNeoConfig(
        vocab_size=TINY_VOCAB, hidden_size=32, num_layers=2, num_heads=2, attention_types=[[["global", "local"], 1]],
        max_position_embeddings=64))
    with pytest.raises(UnsupportedModelError, match=r"'attention_layers'.*Supported model types: .*mamba.*rwkv"):
        find_layers(neo)
    with pytest.raises(UnsupportedModelError, match="has no config"):
        find_layers(torch.nn.Linear(2, 2))


def test_older_transformers_is_refused(monkeypatch):
    """Below the floor pyproject.toml declares, transformers builds several families differently: refuse."""
    import re
    from pathlib import Path

    from layershap.oracle import families

    model = make_tiny_model("llama", 2)
    assert find_layers(model).n_layers == 2
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    floor = re.search(r'"transformers(>=[0-9.]+)"', pyproject).group(1)
    assert floor == ">=5.17"
    # what the installed package metadata says (an editable install made before a floor change still has the old)
    monkeypatch.setattr(families, "_required_transformers", lambda: floor)
    monkeypatch.setattr(families, "_installed_transformers", lambda: "5.16.1")
    with pytest.raises(UnsupportedModelError, match=r"needs transformers>=5\.17.*found 5\.16\.1"):
        find_layers(model)


def test_layershap_loads_its_own_custom_code_and_no_other(tmp_path):
    """`layershap evaluate --model DIR` on a Jamba pruned with custom code runs that code (layershap's own file,
    byte for byte) and refuses a directory whose custom code differs."""
    from layershap.oracle.loading import load_model
    from layershap.oracle.prune import remote_code_option

    model = make_tiny_model("jamba", N_LAYERS, seed=1)
    out = save_pruned_model(model, make_tiny_tokenizer(), masks_from_removed([1], N_LAYERS)[0], tmp_path / "p")
    assert remote_code_option(out) == {"trust_remote_code": True}
    loaded = load_model(str(out), device="cpu")
    assert find_layers(loaded.model).n_layers == N_LAYERS - 1
    assert layer_types(loaded.model) == [layer_types(model)[i] for i in range(N_LAYERS - 1)]
    code = out / "explicit_jamba.py"
    code.write_text(code.read_text() + "\nprint('not layershap')\n")
    with pytest.raises(UnsupportedModelError, match="did not write"):
        load_model(str(out), device="cpu")
    plain = save_pruned_model(make_tiny_model("jamba", N_LAYERS, seed=1), None,
                              masks_from_removed([0, 1], N_LAYERS)[0], tmp_path / "standard")
    assert remote_code_option(plain) == {}
