"""The model hash of model directories: the documented formula, unchanged by config keys that carry no meaning
(a transformers upgrade), changed by any weight value or architecture field; and what happens to records made
with the hash of layershap 0.1.0."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_model, save_tiny_model_dir

from layershap.cli.main import main
from layershap.core.errors import StoreMismatchError
from layershap.oracle.fingerprint import architecture, model_fingerprint, rope_settings
from layershap.oracle.identity import check_same_model
from layershap.oracle.loading import load_model
from layershap.oracle.store import DatasetStore


def expected_hash(model: torch.nn.Module, arch: dict) -> str:
    """The module docstring's formula, computed independently (numpy bytes of every parameter)."""
    names = {id(p): n for n, p in model.named_parameters()}
    names[id(model.get_output_embeddings().weight)] = "output_embeddings.weight"
    names[id(model.get_input_embeddings().weight)] = "input_embeddings.weight"  # the name of a tied head too
    digest = hashlib.sha256(b"weights-v1\n" + json.dumps(arch, sort_keys=True).encode())
    for p in sorted(model.parameters(), key=lambda p: names[id(p)]):
        raw = p.detach().numpy().tobytes()
        digest.update(f"\n{names[id(p)]}|{tuple(p.shape)}|{p.dtype}|".encode() + hashlib.sha256(raw).digest())
    return "weights-v1:" + digest.hexdigest()


def test_the_hash_is_the_documented_formula():
    model = make_tiny_model("llama", 4, 0)
    arch = {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 32, "intermediate_size": 64,
            "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 320, "activation": "silu",
            "norm_eps": 1e-06, "rope": {"*": {"rope_theta": 10000.0, "rope_type": "default"}}}
    assert architecture(model) == arch
    assert model_fingerprint(model) == expected_hash(model, arch)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_config_keys_without_meaning_leave_the_hash(arch, monkeypatch):
    model = make_tiny_model(arch, 4, 0)
    before = model_fingerprint(model)
    model.config.transformers_version = "9.99.0"
    model.config.some_key_a_new_release_adds = {"enabled": True}  # config.to_dict() now has it
    model.config._name_or_path = "/somewhere/else"
    assert "some_key_a_new_release_adds" in model.config.to_dict()
    real = type(model.config).to_dict
    monkeypatch.setattr(type(model.config), "to_dict", lambda self: {**real(self), "renamed_field": 1})
    assert model_fingerprint(model) == before


def test_one_weight_value_anywhere_changes_the_hash():
    model = make_tiny_model("llama", 4, 0)
    before = model_fingerprint(model)
    weight = model.get_input_embeddings().weight  # 320 x 32: 0.1.0 sampled every second value of it
    with torch.no_grad():
        weight.view(-1)[1] += 1e-6
    assert model_fingerprint(model) != before
    with torch.no_grad():
        weight.view(-1)[1] -= 1e-6
    assert model_fingerprint(model) == before
    assert model_fingerprint(model.to(torch.bfloat16)) != before  # another dtype, other bytes


@pytest.mark.parametrize("change", [
    lambda c: c.rope_parameters.update(rope_theta=500000.0),
    lambda c: c.rope_parameters.update(rope_type="linear", factor=8.0),
    lambda c: setattr(c, "rms_norm_eps", 1e-5),
    lambda c: setattr(c, "hidden_act", "gelu"),
    lambda c: (setattr(c, "num_attention_heads", 4), setattr(c, "head_dim", 8)),  # same q/k/v shapes
    lambda c: setattr(c, "sliding_window", 4),
    lambda c: setattr(c, "layer_types", ["sliding_attention", "full_attention"] * 2),
], ids=["rope_theta", "rope_scaling", "norm_eps", "activation", "head_split", "sliding_window", "layer_types"])
def test_an_architecture_field_changes_the_hash(change):
    model = make_tiny_model("llama", 4, 0)
    before = model_fingerprint(model)
    change(model.config)
    assert model_fingerprint(model) != before


def test_defaults_spelled_out_or_not_hash_alike():
    model = make_tiny_model("llama", 4, 0)
    before = model_fingerprint(model)
    model.config.head_dim = 16  # hidden 32 / 2 heads: the default head size
    model.config.layer_types = ["full_attention"] * 4
    assert model_fingerprint(model) == before
    model.config.head_dim = None
    model.config.layer_types = None
    assert model_fingerprint(model) == before


def test_rope_settings_read_alike_from_4x_and_5x_configs():
    """transformers 4.5x spells rope as rope_theta + rope_scaling (Gemma 3: + rope_local_base_freq), 5.x as
    rope_parameters (per attention kind where layers differ): the same settings give the same description."""
    llama4 = SimpleNamespace(rope_theta=500000, rope_scaling={"type": "llama3", "factor": 8, "low_freq_factor": 1})
    llama5 = SimpleNamespace(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0})
    assert rope_settings(llama4) == rope_settings(llama5) == {
        "*": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0}}
    gemma4 = SimpleNamespace(rope_theta=1e6, rope_scaling={"rope_type": "linear", "factor": 8.0},
                             rope_local_base_freq=10000.0)
    gemma5 = SimpleNamespace(rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000}})
    assert rope_settings(gemma4) == rope_settings(gemma5)
    neox4 = SimpleNamespace(rope_theta=10000, rope_scaling=None, partial_rotary_factor=0.25)
    neox5 = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                             "partial_rotary_factor": 0.25})
    assert rope_settings(neox4) == rope_settings(neox5)
    assert rope_settings(llama5) != rope_settings(SimpleNamespace(rope_parameters={"rope_theta": 500000.0}))


def test_the_embeddings_are_named_by_their_role():
    """GPT-NeoX's output head is ``embed_out`` in transformers 4.5x and ``lm_head`` in 5.x: same hash."""
    model = make_tiny_model("gpt_neox", 4, 0)
    before = model_fingerprint(model)
    head = model.get_output_embeddings()
    name = next(n for n, m in model.named_children() if m is head)
    delattr(model, name)
    model.add_module("embed_out" if name == "lm_head" else "lm_head", head)
    model.get_output_embeddings = lambda: head
    assert model_fingerprint(model) == before


LEGACY = "0123456789abcdef" * 4  # a model hash of layershap 0.1.0: 64 hex digits


def test_a_store_made_with_the_old_hash_of_a_model_directory_is_refused_with_the_cause(
        tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "s.zarr"
    quick = ["--windows", "2", "--seq-len", "16", "--device", "cpu", "--no-progress"]
    assert main(["oracle", "--model", str(tiny_model_dir), "--masks", "loo", "--out", str(out), *quick]) == 0
    import zarr

    zarr.open_group(str(out), mode="r+").update_attributes({"model_hash": LEGACY})  # as 0.1.0 wrote it
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    capsys.readouterr()
    assert main(["oracle", "--model", str(tiny_model_dir), "--masks", "loo", "--out", str(out), *quick]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after the progress bars of the load)
    assert err.startswith("layershap oracle: error: the dataset store")
    assert "fingerprint of layershap 0.1.0" in err and "another --out" in err and "0123456789ab" in err
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    assert len(DatasetStore.open(out)) == 5


def test_files_recording_the_old_hash_are_refused_with_the_cause(tmp_path):
    loaded = load_model(str(save_tiny_model_dir(tmp_path / "m", "llama", 3, 1)), device="cpu")
    current = {"model_id": loaded.model_id, "model_hash": loaded.model_hash, "n_layers": 3}
    with pytest.raises(StoreMismatchError, match="fingerprint of layershap 0.1.0.*use its own"):
        check_same_model({"model_hash": LEGACY, "n_layers": 3}, current, what="plans.json", fix="use its own")
    gguf = {"model_hash": "ab" * 32, "n_layers": 3}  # a .gguf file's sha256 against another .gguf: compared
    with pytest.raises(StoreMismatchError, match="different models"):
        check_same_model(gguf, {**gguf, "model_hash": "cd" * 32}, what="plans.json", fix="use its own")
    check_same_model(current, current, what="plans.json", fix="-")
