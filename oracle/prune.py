"""Apply a layer mask permanently: a depth-pruned Hugging Face model that saves, reloads and generates.

Pruning deletes the removed decoder layers from the model's layer ``ModuleList``, renumbers every kept layer's
cache index (``layer_idx``; RWKV's ``layer_id``), and shrinks the config (``num_hidden_layers``, ``layer_types``
and each family's per-layer fields: Qwen's ``max_window_layers``, Jamba's layer periods, Bamba's
``attn_layer_indices``, Zamba2's ``layers_block_type`` and shared-block cycle, see :mod:`.families`) so that
``AutoModelForCausalLM.from_pretrained`` rebuilds exactly the kept layers, each as it was. A Jamba whose kept
layer pattern no period/offset formula gives is saved with Hugging Face's custom-code convention (``auto_map``
and a self-contained ``explicit_jamba.py``); it reloads with ``trust_remote_code=True``, which
``layershap_prune.json`` records (``"trust_remote_code": true``).

Example:
    >>> mask = masks_from_removed([3, 7, 9], 18)[0]   # bool[18], False at 3, 7, 9  # doctest: +SKIP
    >>> save_pruned_model(model, tokenizer, mask, "pruned/")   # prunes ``model`` in place, then saves it  # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained("pruned/")       # 15 layers  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from layershap.core.errors import MaskError, UnsupportedModelError
from layershap.core.jsonio import write_json
from layershap.core.masks import check_masks

from .layers import find_layers

PRUNE_INFO_FILE = "layershap_prune.json"
# the modeling file beside a healed model the standard architecture cannot express (oracle/healed_modeling.py)
HEALED_MODELING_FILE = "layershap_healed.py"


def remote_code_option(path: str | Path) -> dict[str, bool]:
    """``from_pretrained`` keywords for the model directory ``path``: ``{"trust_remote_code": True}`` when its
    only custom code is the one layershap writes beside a pruned model (byte for byte), ``{}`` without custom code.

    A directory with any other custom code is refused: layershap never runs code it did not write.

    Example:
        >>> AutoModelForCausalLM.from_pretrained(path, **remote_code_option(path))  # doctest: +SKIP
    """
    folder = Path(path)
    try:
        auto_map = json.loads((folder / "config.json").read_text()).get("auto_map")
    except (OSError, ValueError):
        return {}
    if not auto_map:
        return {}
    own = own_custom_code_files()
    modules = {str(ref).split("--")[-1].split(".")[0] + ".py" for ref in auto_map.values()}
    if modules <= own.keys() and all((folder / name).is_file() and (folder / name).read_text() == own[name]
                                     for name in modules):
        return {"trust_remote_code": True}
    raise UnsupportedModelError(
        f"{folder} holds custom model code (auto_map: {', '.join(sorted(modules))}) that layershap did not write; "
        "layershap does not run it: review it and load the model yourself with trust_remote_code=True"
    )


def own_custom_code_files() -> dict[str, str]:
    """Every custom modeling file layershap writes beside a model it saves: ``{file name: source}``."""
    from . import healed_modeling
    from .hybrid_families import Jamba

    return {**Jamba({}).custom_code_files(), HEALED_MODELING_FILE: Path(healed_modeling.__file__).read_text()}


def check_out_dir(out_dir: str | Path) -> Path:
    """``out_dir`` as a Path if a model may be written there: new, empty, or an earlier layershap output."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MaskError(f"--out {out} exists and is not a directory; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not (out / PRUNE_INFO_FILE).exists():
        raise MaskError(
            f"--out {out} is a non-empty directory that is not a layershap pruned model; "
            "choose an empty or new directory so nothing there is overwritten"
        )
    return out


def prune_model(model: nn.Module, mask: np.ndarray) -> nn.Module:
    """Delete the layers where ``mask`` is False from ``model`` in place and return it.

    Kept layers are renumbered 0..m-1 (their cache indices), and the config's per-layer fields shrink to match.

    Example:
        >>> prune_model(model, np.array([True, False, True, True]))   # 3 layers left  # doctest: +SKIP
    """
    handle = find_layers(model)
    keep = check_masks(mask, handle.n_layers)[0]
    if not keep.any():
        raise MaskError("the mask removes every decoder layer; keep at least one layer")
    handle.family.check_prunable(model, keep)
    handle.family.prune(model, handle, keep)
    return model


def save_pruned_model(
    model: nn.Module,
    tokenizer: Any | None,
    mask: np.ndarray,
    out_dir: str | Path,
    info: dict[str, Any] | None = None,
) -> Path:
    """Prune ``model`` in place with ``mask`` and write it (plus tokenizer) with ``save_pretrained``.

    Also writes ``layershap_prune.json``: original layer count, removed and kept original indices, whether the
    model needs ``trust_remote_code=True`` to reload, plus ``info``.

    Example:
        >>> save_pruned_model(model, tokenizer, masks_from_removed([3, 7], 18)[0], "pruned/", {"model_id": "g3"})  # doctest: +SKIP
    """
    handle = find_layers(model)
    n_layers = handle.n_layers
    keep = check_masks(mask, n_layers)[0]
    out = check_out_dir(out_dir)
    prune_model(model, keep)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    custom = handle.family.custom_code(model)
    if custom is not None:
        for name, source in custom["files"].items():
            (out / name).write_text(source)
        config_file = out / "config.json"
        write_json(config_file, {**json.loads(config_file.read_text()), **custom["config"]})
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    record = {
        "original_n_layers": int(n_layers),
        "removed_layers": [int(i) for i in np.flatnonzero(~keep)],
        "kept_layers": [int(i) for i in np.flatnonzero(keep)],
        "n_layers": int(keep.sum()),
        "trust_remote_code": custom is not None,
        **(info or {}),
    }
    (out / PRUNE_INFO_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out
