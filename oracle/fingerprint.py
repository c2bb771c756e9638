"""The identity of a loaded model directory or hub model: a content hash of every weight plus the architecture
fields that decide how those weights are used.

``model_hash = "weights-v1:" + sha256`` over

* the architecture (:func:`architecture`): ``model_type`` and the text config's layer count, widths, heads, head
  size, vocabulary, activation, norm epsilon, sliding window, soft-capping, query scale, per-layer attention
  types, parallel residual and pre/post norm, each read under the names it has in transformers 4.5x and 5.x (an absent or ``None`` field is left
  out; defaults spelled out - key/value heads = heads, head size = width / heads, all-``full_attention`` layer
  types - count as absent), and the rotary settings (:func:`rope_settings`: 5.x's ``rope_parameters`` or 4.x's
  ``rope_theta``/``rope_scaling``, in one form);
* every parameter, in name order, tied parameters once (the embeddings named by their role, input or output):
  name, shape, dtype and the sha256 of all its bytes.

Nothing else of ``config.to_dict()`` enters, so a transformers upgrade that adds, renames or drops config keys
(or writes another ``transformers_version``) keeps the hash; one changed weight value, dtype or architecture
field changes it. Buffers are derived from the config and are not hashed. A
release that lays a model's weights out differently in memory (e.g. fuses the experts of a mixture-of-experts
layer into one tensor) changes the hash: stores of that model are then refused with a clear error, never mixed.

Cost: all bytes are read once, hashed on up to :data:`HASH_THREADS` threads (hashlib releases the GIL);
GPU tensors are copied to the host one at a time per thread. ``.gguf`` inputs are identified by the file's
sha256 instead (:func:`~layershap.oracle.loading.load_model`).

Example:
    >>> model_fingerprint(model).startswith("weights-v1:")  # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from .identity import WEIGHTS_SCHEME

# Threads hashing parameters (sha256 runs at ~1-2 GB/s per core).
HASH_THREADS = max(1, min(8, os.cpu_count() or 1))
# Architecture fields of the text config: the name stored in the hash, its kind, then the config names that
# hold it in transformers 4.5x and 5.x (the first one present and not None wins).
ARCHITECTURE_FIELDS: tuple[tuple[str, type, tuple[str, ...]], ...] = (
    ("num_hidden_layers", int, ("num_hidden_layers", "n_layer", "num_layers")),
    ("hidden_size", int, ("hidden_size", "n_embd", "d_model")),
    ("intermediate_size", int, ("intermediate_size", "n_inner", "ffn_dim")),
    ("num_attention_heads", int, ("num_attention_heads", "n_head")),
    ("num_key_value_heads", int, ("num_key_value_heads",)),
    ("head_dim", int, ("head_dim",)),
    ("vocab_size", int, ("vocab_size",)),
    ("activation", str, ("hidden_activation", "hidden_act", "activation_function")),
    ("norm_eps", float, ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon")),
    ("sliding_window", int, ("sliding_window",)),
    ("attn_logit_softcapping", float, ("attn_logit_softcapping",)),
    ("final_logit_softcapping", float, ("final_logit_softcapping",)),
    ("query_pre_attn_scalar", float, ("query_pre_attn_scalar",)),
    ("layer_types", list, ("layer_types",)),
    ("parallel_residual", bool, ("use_parallel_residual",)),
    ("norm_before", bool, ("do_layer_norm_before",)),
)


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _number(value):
    return value if isinstance(value, (bool, str)) or not isinstance(value, (int, float)) else float(value)


def rope_settings(text) -> dict | None:
    """Rotary embedding settings per attention kind (``"*"``: every layer), as ``{kind: {rope_type, rope_theta,
    scaling keys...}}``, read from 5.x's ``rope_parameters`` or 4.x's ``rope_theta`` + ``rope_scaling`` (+ Gemma
    3's ``rope_local_base_freq`` for sliding-window layers); numbers as floats, ``None`` values dropped."""
    params = getattr(text, "rope_parameters", None)
    if isinstance(params, dict) and params:
        kinds = ({str(k): dict(v) for k, v in params.items()} if all(isinstance(v, dict) for v in params.values())
                 else {"*": dict(params)})
    else:
        base = {"rope_theta": getattr(text, "rope_theta", None), **(getattr(text, "rope_scaling", None) or {})}
        local = getattr(text, "rope_local_base_freq", None)
        kinds = {"*": base} if local is None else {"full_attention": base, "sliding_attention": {"rope_theta": local}}
    partial = getattr(text, "partial_rotary_factor", None)
    out = {}
    for kind, values in kinds.items():
        values = {("rope_type" if k == "type" else str(k)): _number(v) for k, v in values.items() if v is not None}
        if partial is not None:
            values.setdefault("partial_rotary_factor", float(partial))
        if values.get("partial_rotary_factor") == 1.0:
            del values["partial_rotary_factor"]
        values.setdefault("rope_type", "default")
        out[kind] = values
    if all(set(v) == {"rope_type"} for v in out.values()):
        return None  # no rotary embedding (e.g. learned positions)
    return out


def architecture(model: nn.Module) -> dict:
    """The architecture fields that enter the model hash (see the module docstring).

    Example:
        >>> architecture(model)["num_hidden_layers"], architecture(model)["rope"]  # doctest: +SKIP
        (18, {'full_attention': {'rope_theta': 1000000.0, 'rope_type': 'default'}, 'sliding_attention': ...})
    """
    config = getattr(model, "config", None)
    fields: dict = {"model_type": getattr(config, "model_type", None) or type(model).__name__}
    text = _text_config(config) if config is not None else None
    for key, kind, names in ARCHITECTURE_FIELDS:
        value = next((getattr(text, n) for n in names if getattr(text, n, None) is not None), None)
        if value is None:
            continue
        value = [str(v) for v in value] if kind is list else kind(value)
        if key == "num_key_value_heads" and value == fields.get("num_attention_heads"):
            continue  # plain multi-head attention, whether the config spells it out or not
        if key == "head_dim" and value * fields.get("num_attention_heads", 0) == fields.get("hidden_size"):
            continue  # the default head size, spelled out or not
        if key == "layer_types" and set(value) <= {"full_attention"}:
            continue
        fields[key] = value
    rope = rope_settings(text) if text is not None else None
    if rope is not None:
        fields["rope"] = rope
    return fields


def _host_bytes(tensor: torch.Tensor) -> memoryview:
    """All bytes of ``tensor`` (copied to the host when it lives elsewhere), without another copy."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _tensor_sha256(tensor: torch.Tensor) -> bytes:
    return hashlib.sha256(_host_bytes(tensor)).digest()


def _named_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter once (tied ones under one name), the embeddings under their role rather than their
    attribute name (``input_embeddings.weight``, ``output_embeddings.weight``: e.g. GPT-NeoX's ``embed_out``
    became ``lm_head`` in transformers 5)."""
    roles: dict[int, str] = {}
    for role, getter in (("output_embeddings", "get_output_embeddings"), ("input_embeddings", "get_input_embeddings")):
        module = getattr(model, getter, lambda: None)()
        if isinstance(module, nn.Module):
            roles.update({id(p): f"{role}.{local}" for local, p in module.named_parameters()})
    return [(roles.get(id(p), name), p) for name, p in model.named_parameters()]


def model_fingerprint(model: nn.Module) -> str:
    """``"weights-v1:<sha256>"``: the content hash of every weight and the architecture (module docstring).

    Example:
        >>> model_fingerprint(model).startswith("weights-v1:")  # doctest: +SKIP
        True
    """
    params = sorted(_named_weights(model), key=lambda item: item[0])
    meta = [name for name, p in params if p.device.type == "meta"]
    if meta:
        raise ValueError(f"cannot hash a model whose weights are not loaded (on the meta device: {meta[:3]})")
    digest = hashlib.sha256(f"{WEIGHTS_SCHEME}\n".encode())
    digest.update(json.dumps(architecture(model), sort_keys=True).encode())
    with torch.no_grad(), ThreadPoolExecutor(HASH_THREADS) as pool:
        for (name, param), tensor_digest in zip(params, pool.map(lambda item: _tensor_sha256(item[1]), params)):
            digest.update(f"\n{name}|{tuple(param.shape)}|{param.dtype}|".encode() + tensor_digest)
    return f"{WEIGHTS_SCHEME}:{digest.hexdigest()}"
