"""The shared part of every architecture family: config helpers, the layer stand-in, and the base
:class:`Family` (what skipping and deleting layers takes when nothing but ``num_hidden_layers`` and
``layer_types`` describes individual layers: the transformers and the state-space models).

Example:
    >>> Transformer({"llama": "model.layers"}).narrowed(config, [0, 2])["num_hidden_layers"]  # doctest: +SKIP
    2
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

from layershap.core.errors import UnsupportedModelError

_MISSING = object()


def text_config(model: nn.Module):
    """The config that describes the decoder layers (the text config of a multimodal model)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def resolve(root: nn.Module, path: str) -> Any:
    """``root`` followed along a dotted attribute path."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def field_name(config, name: str) -> str:
    """The attribute that really holds ``name`` (configs alias some names through ``attribute_map``)."""
    return getattr(type(config), "attribute_map", {}).get(name, name)


def is_derived(config, name: str) -> bool:
    """True when ``name`` is a read-only property of the config class (computed from other fields)."""
    return isinstance(getattr(type(config), field_name(config, name), None), property)


class LayerWrapper(nn.Module):
    """Stands in for decoder layer ``layer`` in a rebound layer list.

    Decoder loops read attributes of each list entry (transformers 4.5x reads ``attention_type`` to pick the
    mask), so every attribute the wrapper does not have itself is read from ``layer``. The layer is not a
    registered submodule: ``modules()`` and ``state_dict()`` see it once, at its own place.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_stand_in_for", layer)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = self.__dict__.get("_stand_in_for")
            if layer is None:
                raise
            return getattr(layer, name)


class Family:
    """A family whose layers need nothing but the rebound list and narrowed ``num_hidden_layers`` /
    ``layer_types`` (the transformers and state-space models); subclasses override the hooks."""

    name = "transformer"
    index_attrs: tuple[str, ...] = ("layer_idx",)
    default_type = "full_attention"

    def __init__(self, paths: dict[str, str]) -> None:
        self.paths = dict(paths)

    def layer_path(self, model: nn.Module) -> str:
        return self.paths[model.config.model_type]

    def types(self, model: nn.Module, n_layers: int) -> list[str]:
        """Per-layer types: ``config.layer_types`` when the config has them, else ``default_type``."""
        types = getattr(text_config(model), "layer_types", None)
        return list(types) if types is not None else [self.default_type] * n_layers

    def narrowed(self, config, kept: Sequence[int]) -> dict[str, Any]:
        """Config values of a model made of the original layers ``kept``, in that order (``kept`` may repeat no
        index and is increasing)."""
        values: dict[str, Any] = {"num_hidden_layers": len(kept)}
        types = getattr(config, "layer_types", None)
        if types is not None and not is_derived(config, "layer_types"):
            values[field_name(config, "layer_types")] = [types[j] for j in kept]
        heal = getattr(config, "layershap_heal", None)
        if heal:  # a healed model (layershap heal): its patches ride on kept layers, renumbered with them
            patches = heal.get("patches", {})
            values["layershap_heal"] = {**heal, "patches": {str(new): patches[str(old)] for new, old in
                                                            enumerate(kept) if str(old) in patches}}
        max_window = getattr(config, "max_window_layers", None)
        if isinstance(max_window, int) and not isinstance(max_window, bool):
            # Qwen 2/3: layers at index >= max_window_layers use sliding windows; kept ones stay in order
            values["max_window_layers"] = sum(1 for j in kept if j < max_window)
        return values

    @contextlib.contextmanager
    def configured(self, config, values: dict[str, Any]) -> Iterator[None]:
        """Temporarily set ``values`` on ``config``; restores every field (and removes added ones) on exit."""
        saved = [(key, config.__dict__.get(key, _MISSING)) for key in values]
        try:
            for key, value in values.items():
                setattr(config, key, value)
            yield
        finally:
            for key, value in reversed(saved):
                if value is _MISSING:
                    config.__dict__.pop(key, None)
                else:
                    setattr(config, key, value)

    def apply(self, config, values: dict[str, Any]) -> None:
        """Set ``values`` on ``config`` for good (pruning)."""
        for key, value in values.items():
            setattr(config, key, value)

    @contextlib.contextmanager
    def binding(self, model: nn.Module) -> Iterator[None]:
        """Held while a rebound layer list runs (RWKV: unrescaled blocks)."""
        yield

    def bound_modules(self, model: nn.Module, modules: list[nn.Module], kept: Sequence[int]) -> list[nn.Module]:
        """The entries a rebound list holds for ``modules`` standing for original layers ``kept``."""
        return modules

    def check_prunable(self, model: nn.Module, keep: Sequence[bool]) -> None:
        """Raise when deleting the layers where ``keep`` is False cannot give a correct model."""

    def prune(self, model: nn.Module, handle, keep: Sequence[bool]) -> None:
        """Delete the layers where ``keep`` is False in place: renumber the kept layers' indices (cache slots),
        rebind the list, narrow the config."""
        kept = [i for i, k in enumerate(keep) if k]
        config = text_config(model)
        values = self.narrowed(config, kept)
        layers = [handle.layers[i] for i in kept]
        for new_idx, layer in enumerate(layers):
            for module in layer.modules():
                for attr in self.index_attrs:
                    value = getattr(module, attr, None)
                    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                        setattr(module, attr, new_idx)
        setattr(handle.parent, handle.attr, nn.ModuleList(layers))
        self.apply(config, values)
        if config is not model.config and hasattr(model.config, "num_hidden_layers"):
            model.config.num_hidden_layers = len(layers)

    def custom_code(self, model: nn.Module) -> dict[str, Any] | None:
        """For a pruned model the standard config cannot describe: ``{"files": {name: source}, "config":
        {key: value}}`` to write beside it (Hugging Face's ``auto_map`` convention); else None."""
        return None


class Transformer(Family):
    """Decoder-only transformers; GPT-2's ``scale_attn_by_inverse_layer_idx`` forbids renumbering."""

    def check_prunable(self, model: nn.Module, keep: Sequence[bool]) -> None:
        kept = [i for i, k in enumerate(keep) if k]
        if kept != list(range(len(kept))) and getattr(text_config(model), "scale_attn_by_inverse_layer_idx", False):
            raise UnsupportedModelError(
                "this GPT-2 model scales attention by 1/(layer index + 1) (scale_attn_by_inverse_layer_idx=True), "
                "so its layers cannot be renumbered without changing what they compute; only removing trailing "
                "layers is supported for it"
            )


class StateSpace(Family):
    """Mamba, Mamba2, FalconMamba: every block is a Mamba mixer; ``layer_types`` is derived from the count."""

    name = "state-space"
    default_type = "linear_attention"
