"""Locate a causal LM's decoder layer list and run it with chosen layers skipped.

Skipping rebinds the model's layer ``ModuleList`` to the kept layers (no weight copies, no zeroing) and narrows
the config fields that describe individual layers (``num_hidden_layers``, ``layer_types`` and the family's own,
see :mod:`.families`) for the duration, so every kept layer computes exactly what it computes in the full model
(Gemma 2/3 interleave sliding and full attention; Jamba, Bamba and Zamba2 interleave attention and Mamba layers).

Example:
    >>> with skip_layers(model, np.array([True, False, True])):  # doctest: +SKIP
    ...     out = model(input_ids, use_cache=False)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from layershap.core.errors import UnsupportedModelError
from layershap.core.masks import check_masks

from .families import LAYER_PATHS, Family, family_of, resolve, text_config

__all__ = ["LAYER_PATHS", "LayerHandle", "bind_layers", "find_layers", "layer_types", "skip_layers"]


@dataclass(frozen=True)
class LayerHandle:
    """Where a model keeps its decoder layers: ``getattr(parent, attr)`` is the full ``ModuleList``."""

    parent: nn.Module
    attr: str
    layers: nn.ModuleList
    family: Family
    path: str

    @property
    def n_layers(self) -> int:
        return len(self.layers)


def find_layers(model: nn.Module) -> LayerHandle:
    """Return the decoder layer list of a supported Hugging Face causal LM (see :mod:`.families`)."""
    family = family_of(model)
    path = family.layer_path(model)
    parent_path, attr = path.rsplit(".", 1)
    parent = resolve(model, parent_path)
    layers = getattr(parent, attr)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(f"{type(model).__name__}.{path} is {type(layers).__name__}, not a ModuleList")
    return LayerHandle(parent=parent, attr=attr, layers=layers, family=family, path=path)


def layer_types(model: nn.Module) -> list[str]:
    """Per-layer types (``config.layer_types``: attention kinds, ``linear_attention`` for state-space layers)."""
    handle = find_layers(model)
    return handle.family.types(model, handle.n_layers)


@contextlib.contextmanager
def bind_layers(model: nn.Module, modules: list[nn.Module], kept: Sequence[int]) -> Iterator[None]:
    """Temporarily replace the model's decoder layer list by ``modules``, which stand for the original layers
    ``kept`` (increasing; a module may be a stand-in, e.g. a replayed hidden state), and narrow the config to them.

    Restores the original list and config on exit, also after an exception.
    """
    handle = find_layers(model)
    family = handle.family
    if len(modules) != len(kept):
        raise ValueError(f"{len(modules)} modules stand for {len(kept)} layers")
    config = text_config(model)
    values = family.narrowed(config, list(kept))
    with family.binding(model), family.configured(config, values):
        setattr(handle.parent, handle.attr, nn.ModuleList(family.bound_modules(model, list(modules), list(kept))))
        try:
            yield
        finally:
            setattr(handle.parent, handle.attr, handle.layers)


@contextlib.contextmanager
def skip_layers(model: nn.Module, mask: np.ndarray) -> Iterator[None]:
    """Temporarily run ``model`` with only the layers where ``mask`` is True.

    Restores the original layer list and config on exit, also after an exception.
    """
    handle = find_layers(model)
    keep = check_masks(mask, handle.n_layers)[0]
    kept = [int(i) for i in np.flatnonzero(keep)]
    with bind_layers(model, [handle.layers[i] for i in kept], kept):
        yield
