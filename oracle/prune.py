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

    return {**Jamba({}).custom_code_files(), HEALED_MODELING_FILE: Path(healed_modeling.__file__).read_text(),
            **sublayer_code_files()}


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


def sublayer_code_files() -> dict[str, str]:
    """The custom code a model pruned by sublayers may need: ``{file name: source}``."""
    from . import sublayer_model

    return {"sublayer_model.py": Path(sublayer_model.__file__).read_text()}


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


def save_sublayer_pruned_model(
    model: nn.Module,
    tokenizer: Any | None,
    mask: np.ndarray,
    out_dir: str | Path,
    info: dict[str, Any] | None = None,
) -> Path:
    """Prune ``model`` in place by a sublayer mask (``bool[2n]``: entry ``2i`` layer ``i``'s attention, ``2i+1``
    its MLP) and write it: layers that lose both sublayers are deleted (:func:`save_pruned_model`, a standard
    folder when no layer keeps only one); a layer that keeps one becomes a
    :class:`~layershap.oracle.sublayer_model.PartialDecoderLayer` without the other's weights, saved with the
    custom code ``sublayer_model.py`` named in the config's ``auto_map`` (reload with ``trust_remote_code=True``).

    Example:
        >>> save_sublayer_pruned_model(model, tokenizer, np.array([1, 1, 0, 1, 1, 0, 1, 1], bool), "pruned/")  # doctest: +SKIP
    """
    from .sublayer_model import SAVED_BASES, partial_layers
    from .sublayers import player_names, split_mask, sublayer_spec

    handle = find_layers(model)
    n_layers = handle.n_layers
    arr = check_masks(mask, 2 * n_layers)[0]
    sublayer_spec(model)
    model_type = model.config.model_type
    if model_type not in SAVED_BASES:
        raise UnsupportedModelError(f"a {model_type!r} model cannot be saved with sublayers removed; supported: "
                                    f"{', '.join(sorted(SAVED_BASES))}")
    attn, mlp = split_mask(arr)
    blocks = attn | mlp
    names = player_names(n_layers)
    record = {"original_n_sublayers": 2 * n_layers,
              "removed_sublayers": [names[p] for p in np.flatnonzero(~arr)], **(info or {})}
    kept = [int(i) for i in np.flatnonzero(blocks)]
    no_attention = [j for j, i in enumerate(kept) if not attn[i]]
    no_mlp = [j for j, i in enumerate(kept) if not mlp[i]]
    if not no_attention and not no_mlp:
        return save_pruned_model(model, tokenizer, blocks, out_dir, record)
    out = check_out_dir(out_dir)
    if not blocks.any():
        raise MaskError("the mask removes every decoder layer; keep at least one sublayer")
    prune_model(model, blocks)
    partial_layers(model, no_attention, no_mlp)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    stem = SAVED_BASES[model_type]
    files = sublayer_code_files()
    for name, source in files.items():
        (out / name).write_text(source)
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    module = next(iter(files)).removesuffix(".py")
    config.update({
        "model_type": f"layershap_sublayer_{model_type}", "architectures": [f"Sublayer{stem}ForCausalLM"],
        "auto_map": {"AutoConfig": f"{module}.Sublayer{stem}Config",
                     "AutoModelForCausalLM": f"{module}.Sublayer{stem}ForCausalLM"},
        "layershap_no_attention": no_attention, "layershap_no_mlp": no_mlp,
    })
    write_json(config_file, config)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    record.update({
        "original_n_layers": int(n_layers),
        "removed_layers": [int(i) for i in np.flatnonzero(~blocks)], "kept_layers": kept, "n_layers": len(kept),
        "layers_without_attention": no_attention, "layers_without_mlp": no_mlp, "trust_remote_code": True,
    })
    (out / PRUNE_INFO_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out
