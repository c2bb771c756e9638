"""Shared test fixtures: tiny random causal LMs of every supported architecture, and a tokenizer built offline."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_VOCAB = 320
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2", "opt", "gpt_neox"]
# State-space, RWKV and hybrid attention/state-space decoders (tests/oracle/test_architectures.py).
RECURRENT_ARCHS = ["mamba", "mamba2", "falcon_mamba", "rwkv", "jamba", "bamba", "zamba2"]


def tiny_config(arch: str, n_layers: int = 4, vocab: int = TINY_VOCAB):
    """A tiny transformers config (hidden 32) of ``arch``; Gemma 2/3 get mixed sliding/full layers."""
    import transformers as tf

    common = {"vocab_size": vocab, "num_hidden_layers": n_layers, "num_attention_heads": 2}
    llama_like = dict(common, hidden_size=32, intermediate_size=64, num_key_value_heads=1,
                      max_position_embeddings=256)
    mixed = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    if arch == "llama":
        return tf.LlamaConfig(**llama_like)
    if arch == "mistral":
        return tf.MistralConfig(**llama_like, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if arch == "qwen3":
        return tf.Qwen3Config(**llama_like, head_dim=16)
    if arch == "gemma2":
        return tf.Gemma2Config(**llama_like, head_dim=16, sliding_window=4, layer_types=mixed)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**llama_like, head_dim=16, sliding_window=4, layer_types=mixed)
    if arch == "phi3":
        return tf.Phi3Config(**llama_like, pad_token_id=0)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_layer=n_layers, n_head=2, n_embd=32, n_positions=256)
    if arch == "opt":
        return tf.OPTConfig(vocab_size=vocab, num_hidden_layers=n_layers, num_attention_heads=2, hidden_size=32,
                            ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=256)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(**common, hidden_size=32, intermediate_size=64, max_position_embeddings=256)
    mamba = {"vocab_size": vocab, "num_hidden_layers": n_layers, "hidden_size": 32, "state_size": 4, "expand": 2,
             "conv_kernel": 3}
    if arch == "mamba":
        return tf.MambaConfig(**mamba)
    if arch == "mamba2":
        return tf.Mamba2Config(**mamba, num_heads=4, head_dim=16, n_groups=1, chunk_size=8)
    if arch == "falcon_mamba":
        return tf.FalconMambaConfig(**mamba)
    if arch == "rwkv":  # rescale_every=2: the inference-time rescaling acts within 5 blocks
        return tf.RwkvConfig(vocab_size=vocab, num_hidden_layers=n_layers, hidden_size=32, attention_hidden_size=32,
                             intermediate_size=64, rescale_every=2, context_length=256)
    hybrid = dict(llama_like, mamba_d_state=4, mamba_d_conv=3)
    if arch == "jamba":  # attention at odd layers, a 2-expert MoE at even layers
        return tf.JambaConfig(**hybrid, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                              expert_layer_offset=0, num_experts=2, num_experts_per_tok=1, mamba_expand=2)
    if arch == "bamba":
        return tf.BambaConfig(**hybrid, attn_layer_indices=[i for i in range(n_layers) if i % 3 == 1],
                              mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_chunk_size=8)
    if arch == "zamba2":  # hybrid layers cycle through 2 shared transformer blocks, each with per-layer adapters
        pattern = ["mamba", "hybrid", "hybrid"]
        hybrid.pop("num_key_value_heads")
        return tf.Zamba2Config(**hybrid, layers_block_type=[pattern[i % 3] for i in range(n_layers)],
                               n_mamba_heads=4, num_key_value_heads=2, num_mem_blocks=2, adapter_rank=4,
                               use_shared_attention_adapter=True, use_mem_rope=True, chunk_size=8)
    raise ValueError(f"no tiny config for {arch}")


def make_tiny_model(arch: str = "llama", n_layers: int = 4, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM in eval mode, float32, weights scaled so layers matter."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, n_layers), dtype=torch.float32)
    with torch.no_grad():  # larger-than-default init so that skipping a layer visibly changes the loss
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.2)
    return model.eval()


def make_tiny_tokenizer(text: str | None = None):
    """A byte-level BPE tokenizer trained in-process (no hub) with ``<s>`` as BOS, vocab <= TINY_VOCAB."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if text is None:
        from pydoc_data.topics import topics

        text = "\n".join(list(topics.values())[:40])
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_tiny_model_dir(path: Path, arch: str = "llama", n_layers: int = 4, seed: int = 0) -> Path:
    """Save a tiny model plus tokenizer with ``save_pretrained`` so it loads like a local checkpoint."""
    model = make_tiny_model(arch, n_layers, seed)
    tokenizer = make_tiny_tokenizer()
    model.config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run ~100x faster on one thread when the 2 shared cores are busy (no OpenMP barrier waits).

    Module-scoped, so a module's shared fixtures (stores, surrogates) are built on one thread too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny 4-layer Llama + tokenizer directory shared by the whole test session."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), "llama", 4, 0)


# Where each tiny architecture keeps its decoder layers (written out here, independently of the library's table).
_LAYER_PATHS = {"gpt2": "transformer.h", "opt": "model.decoder.layers", "gpt_neox": "gpt_neox.layers",
                "gemma3": "model.language_model.layers"}


def loss_with_layers_deleted(model: torch.nn.Module | Path | str, ids, removed=()) -> float:
    """The reference every oracle test compares with: HF's own causal-LM loss (``labels=``) of a deep copy of
    ``model`` (or of the model saved in a directory) with the ``removed`` layers deleted from its decoder
    ``ModuleList`` and the config shrunk to match (``num_hidden_layers``, ``layer_types``)."""
    import copy

    from transformers import AutoModelForCausalLM

    if isinstance(model, (str, Path)):
        m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    else:
        m = copy.deepcopy(model)
    gone = {int(removed)} if isinstance(removed, (int,)) else {int(i) for i in removed}
    parent_path, attr = _LAYER_PATHS.get(m.config.model_type, "model.layers").rsplit(".", 1)
    parent = m
    for part in parent_path.split("."):
        parent = getattr(parent, part)
    layers = getattr(parent, attr)
    setattr(parent, attr, torch.nn.ModuleList([layer for i, layer in enumerate(layers) if i not in gone]))
    config = m.config.get_text_config() if hasattr(m.config, "get_text_config") else m.config
    config.num_hidden_layers = len(layers) - len(gone)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in gone]
    ids = torch.as_tensor(np.asarray(ids))
    with torch.no_grad():
        return float(m(input_ids=ids, labels=ids, use_cache=False).loss)


@pytest.fixture(autouse=True)
def private_registry(tmp_path_factory, monkeypatch):
    """Every test gets its own surrogate registry: nothing is written into the user's cache."""
    monkeypatch.setenv("LAYERSHAP_REGISTRY", str(tmp_path_factory.mktemp("registry")))
