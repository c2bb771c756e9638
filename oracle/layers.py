"""Locate a causal LM's decoder layer list and run it with chosen layers skipped.

Skipping rebinds the model's layer ``ModuleList`` to the kept layers (no weight copies, no zeroing) and
narrows ``config.num_hidden_layers`` / ``config.layer_types`` so every kept layer keeps its own attention
type (Gemma 2/3 interleave sliding and full attention).

Example:
    >>> with skip_layers(model, np.array([True, False, True])):
    ...     out = model(input_ids, use_cache=False)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from torch import nn

from layershap.core.errors import UnsupportedModelError
from layershap.core.masks import check_masks

# model_type -> dotted path of the decoder layer ModuleList from the CausalLM object.
LAYER_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "gemma3": "model.language_model.layers",
    "phi3": "model.layers",
    "gpt2": "transformer.h",
    "opt": "model.decoder.layers",
    "gpt_neox": "gpt_neox.layers",
}


@dataclass(frozen=True)
class LayerHandle:
    """Where a model keeps its decoder layers: ``getattr(parent, attr)`` is the full ``ModuleList``."""

    parent: nn.Module
    attr: str
    layers: nn.ModuleList

    @property
    def n_layers(self) -> int:
        return len(self.layers)


def find_layers(model: nn.Module) -> LayerHandle:
    """Return the decoder layer list of a supported Hugging Face causal LM."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    path = LAYER_PATHS.get(model_type or "")
    if path is None:
        supported = ", ".join(sorted(LAYER_PATHS))
        raise UnsupportedModelError(
            f"layershap does not know where model_type={model_type!r} keeps its decoder layers "
            f"(class {type(model).__name__}). Supported model types: {supported}."
        )
    parent_path, attr = path.rsplit(".", 1)
    parent = model
    for part in parent_path.split("."):
        parent = getattr(parent, part)
    layers = getattr(parent, attr)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(f"{type(model).__name__}.{path} is {type(layers).__name__}, not a ModuleList")
    return LayerHandle(parent=parent, attr=attr, layers=layers)


def layer_types(model: nn.Module) -> list[str]:
    """Per-layer attention types (``config.layer_types``), or ``full_attention`` for every layer."""
    n = find_layers(model).n_layers
    types = getattr(_text_config(model), "layer_types", None)
    return list(types) if types is not None else ["full_attention"] * n


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@contextlib.contextmanager
def bind_layers(model: nn.Module, modules: list[nn.Module], types: list[str] | None) -> Iterator[None]:
    """Temporarily replace the model's decoder layer list by ``modules`` (and ``config.layer_types`` by ``types``).

    Restores the original list and config on exit, also after an exception.
    """
    handle = find_layers(model)
    config = _text_config(model)
    saved_types = getattr(config, "layer_types", None)
    saved_n = config.num_hidden_layers
    setattr(handle.parent, handle.attr, nn.ModuleList(modules))
    try:
        config.num_hidden_layers = len(modules)
        if saved_types is not None and types is not None:
            config.layer_types = list(types)
        yield
    finally:
        setattr(handle.parent, handle.attr, handle.layers)
        config.num_hidden_layers = saved_n
        if saved_types is not None:
            config.layer_types = saved_types


@contextlib.contextmanager
def skip_layers(model: nn.Module, mask: np.ndarray) -> Iterator[None]:
    """Temporarily run ``model`` with only the layers where ``mask`` is True.

    Restores the original layer list and config on exit, also after an exception.
    """
    handle = find_layers(model)
    keep = check_masks(mask, handle.n_layers)[0]
    types = getattr(_text_config(model), "layer_types", None)
    kept_types = None if types is None else [t for t, k in zip(types, keep) if k]
    with bind_layers(model, [layer for layer, k in zip(handle.layers, keep) if k], kept_types):
        yield
