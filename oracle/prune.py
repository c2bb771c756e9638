"""Apply a layer mask permanently: a depth-pruned Hugging Face model that saves, reloads and generates.

Pruning deletes the removed decoder layers from the model's layer ``ModuleList``, renumbers every kept layer's
``layer_idx`` (the KV-cache index of its attention), and shrinks the config (``num_hidden_layers``,
``layer_types`` and, for Qwen2/3, ``max_window_layers``) so that ``AutoModelForCausalLM.from_pretrained``
rebuilds exactly the kept layers, each with its own attention type.

Example:
    >>> mask = masks_from_removed([3, 7, 9], 18)[0]   # bool[18], False at 3, 7, 9
    >>> save_pruned_model(model, tokenizer, mask, "pruned/")   # prunes ``model`` in place, then saves it
    >>> AutoModelForCausalLM.from_pretrained("pruned/")       # 15 layers
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from layershap.core.errors import MaskError, UnsupportedModelError
from layershap.core.masks import check_masks

from .layers import _text_config, find_layers

PRUNE_INFO_FILE = "layershap_prune.json"


def _check_prunable(model: nn.Module, keep: np.ndarray) -> None:
    kept = np.flatnonzero(keep)
    if kept.size == 0:
        raise MaskError("the mask removes every decoder layer; keep at least one layer")
    config = _text_config(model)
    renumbered = bool((kept != np.arange(kept.size)).any())
    if renumbered and getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise UnsupportedModelError(
            "this GPT-2 model scales attention by 1/(layer index + 1) (scale_attn_by_inverse_layer_idx=True), "
            "so its layers cannot be renumbered without changing what they compute; only removing trailing "
            "layers is supported for it"
        )


def prune_model(model: nn.Module, mask: np.ndarray) -> nn.Module:
    """Delete the layers where ``mask`` is False from ``model`` in place and return it.

    Kept layers are renumbered 0..m-1 (``layer_idx`` of the layer and of its attention), and the text
    config's ``num_hidden_layers`` / ``layer_types`` (and ``max_window_layers`` when present) shrink to match.

    Example:
        >>> prune_model(model, np.array([True, False, True, True]))   # 3 layers left
    """
    handle = find_layers(model)
    keep = check_masks(mask, handle.n_layers)[0]
    _check_prunable(model, keep)
    config = _text_config(model)
    kept_layers = [layer for layer, k in zip(handle.layers, keep) if k]
    for new_idx, layer in enumerate(kept_layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    setattr(handle.parent, handle.attr, nn.ModuleList(kept_layers))

    types = getattr(config, "layer_types", None)
    if types is not None:
        config.layer_types = [t for t, k in zip(types, keep) if k]
    max_window = getattr(config, "max_window_layers", None)
    if isinstance(max_window, int):
        config.max_window_layers = int(keep[: max(0, max_window)].sum())
    config.num_hidden_layers = len(kept_layers)
    if config is not model.config and hasattr(model.config, "num_hidden_layers"):
        model.config.num_hidden_layers = len(kept_layers)
    return model


def save_pruned_model(
    model: nn.Module,
    tokenizer: Any | None,
    mask: np.ndarray,
    out_dir: str | Path,
    info: dict[str, Any] | None = None,
) -> Path:
    """Prune ``model`` in place with ``mask`` and write it (plus tokenizer) with ``save_pretrained``.

    Also writes ``layershap_prune.json``: original layer count, removed and kept original indices, plus ``info``.

    Example:
        >>> save_pruned_model(model, tokenizer, masks_from_removed([3, 7], 18)[0], "pruned/", {"model_id": "g3"})
    """
    n_layers = find_layers(model).n_layers
    keep = check_masks(mask, n_layers)[0]
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MaskError(f"--out {out} exists and is not a directory; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not (out / PRUNE_INFO_FILE).exists():
        raise MaskError(
            f"--out {out} is a non-empty directory that is not a layershap pruned model; "
            "choose an empty or new directory so nothing there is overwritten"
        )
    prune_model(model, keep)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    record = {
        "original_n_layers": int(n_layers),
        "removed_layers": [int(i) for i in np.flatnonzero(~keep)],
        "kept_layers": [int(i) for i in np.flatnonzero(keep)],
        "n_layers": int(keep.sum()),
        **(info or {}),
    }
    (out / PRUNE_INFO_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out
