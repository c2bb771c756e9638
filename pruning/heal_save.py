"""Save a healed depth-pruned model as a folder that Hugging Face's ``from_pretrained`` reloads.

Two forms, picked per architecture and method:

- **fused** (standard architecture, no layershap needed to reload): on Llama, Mistral, Qwen 2/3 and Phi-3 the
  patch acts on the MLP's output ``M = u @ W^T`` (``W = down_proj.weight``), so ``M + M @ delta`` is exactly
  ``u @ (W + delta^T W)^T``: ``linear`` and ``lowrank:R`` fold into the carrier's ``down_proj`` weight. A ``bias``
  needs a ``down_proj`` bias, which only Llama's config can switch on (``mlp_bias``; every other MLP bias is
  saved as zeros, so nothing else changes).
- **custom code** (everything else: Gemma 2/3 normalise the MLP output after ``down_proj``, and Mistral, Qwen and
  Phi-3 have no MLP bias option): the patches stay real modules, rebuilt by ``layershap_healed.py`` (a copy of
  :mod:`layershap.oracle.healed_modeling`) that the config's ``auto_map`` names; reload with
  ``trust_remote_code=True`` (``layershap_prune.json`` says so).

Example:
    >>> healing = fit_healing(model, windows, [7, 8], "linear")  # doctest: +SKIP
    >>> save_healed_model(model, tokenizer, healing, "healed/")    # prunes and heals ``model`` in place  # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained("healed/")           # fused form: plain transformers  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from layershap.core.jsonio import write_json
from layershap.oracle.healed_modeling import BASES, HEAL_ATTR, remove_patch
from layershap.oracle.layers import find_layers
from layershap.oracle.prune import HEALED_MODELING_FILE, PRUNE_INFO_FILE, check_out_dir, own_custom_code_files

from .heal import Healing, apply_healing

FUSABLE = {"llama", "mistral", "qwen2", "qwen3", "phi3"}  # patch on the MLP output, right after down_proj
BIAS_OPTION = {"llama": "mlp_bias"}  # the config switch that gives down_proj a bias


def saved_form(model_type: str, healing: Healing) -> str:
    """``"fused"`` when the standard architecture expresses the healed model exactly, else ``"custom code"``.

    Example:
        >>> healing = fit_healing(model, windows, [7, 8], "linear")  # doctest: +SKIP
        >>> saved_form("llama", healing), saved_form("gemma3_text", healing)  # doctest: +SKIP
        ('fused', 'custom code')
    """
    has_bias = any(s.bias is not None for s in healing.spans)
    if model_type in FUSABLE and (not has_bias or model_type in BIAS_OPTION):
        return "fused"
    return "custom code"


def _carriers(model: nn.Module, healing: Healing) -> list[nn.Module]:
    layers = find_layers(model).layers
    return [layer for layer in layers if hasattr(getattr(layer, healing.branch), HEAL_ATTR)]


def fuse_patches(model: nn.Module, healing: Healing) -> None:
    """Fold the installed patches of an :func:`apply_healing` model into ``down_proj`` (see module docstring)."""
    model_type = model.config.model_type
    carriers = _carriers(model, healing)
    patches = [remove_patch(layer, healing.branch) for layer in carriers]
    if any(p.bias is not None for p in patches):
        model.config.__dict__[BIAS_OPTION[model_type]] = True
        for layer in find_layers(model).layers:
            for proj in (m for m in layer.mlp.modules() if isinstance(m, nn.Linear) and m.bias is None):
                proj.bias = nn.Parameter(torch.zeros(proj.out_features, dtype=proj.weight.dtype,
                                                     device=proj.weight.device))
    with torch.no_grad():
        for layer, patch in zip(carriers, patches):
            proj = layer.mlp.down_proj
            weight = proj.weight.to(torch.float64)
            delta = torch.zeros(weight.shape[0], weight.shape[0], dtype=torch.float64, device=weight.device)
            if patch.delta is not None:
                delta += patch.delta.to(delta)
            if patch.down is not None:
                delta += patch.down.to(delta) @ patch.up.to(delta)
            proj.weight.copy_(weight + delta.T @ weight)
            if patch.bias is not None:
                proj.bias.copy_(proj.bias + patch.bias.to(proj.bias))


def save_healed_model(model: nn.Module, tokenizer: Any | None, healing: Healing, out_dir: str | Path,
                      info: dict[str, Any] | None = None) -> Path:
    """Prune and heal ``model`` in place and save it to ``out_dir`` (fused or custom code, see module docstring),
    with the tokenizer and ``layershap_prune.json`` (the usual pruning record plus ``"healing"``).

    Example:
        >>> out = save_healed_model(model, tokenizer, healing, "healed/", {"model_id": "gemma-3-270m"})  # doctest: +SKIP
        >>> AutoModelForCausalLM.from_pretrained(out, **remote_code_option(out))  # doctest: +SKIP
    """
    out = check_out_dir(out_dir)
    model_type = model.config.model_type
    form = saved_form(model_type, healing)
    apply_healing(model, healing)
    out.mkdir(parents=True, exist_ok=True)
    if form == "fused":
        fuse_patches(model, healing)
        model.save_pretrained(out)
    else:
        layers = find_layers(model).layers
        model.config.layershap_heal = {"branch": healing.branch, "patches": {
            str(i): getattr(getattr(layer, healing.branch), HEAL_ATTR).spec()
            for i, layer in enumerate(layers) if hasattr(getattr(layer, healing.branch), HEAL_ATTR)}}
        model.save_pretrained(out)
        config_name, model_name, _ = BASES[model_type]
        stem = HEALED_MODELING_FILE.removesuffix(".py")
        (out / HEALED_MODELING_FILE).write_text(own_custom_code_files()[HEALED_MODELING_FILE])
        config_file = out / "config.json"
        write_json(config_file, {**json.loads(config_file.read_text()),
                                 "model_type": f"layershap_healed_{model_type}",
                                 "architectures": [f"Healed{model_name}"],
                                 "auto_map": {"AutoConfig": f"{stem}.Healed{config_name}",
                                              "AutoModelForCausalLM": f"{stem}.Healed{model_name}"}})
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    keep = healing.mask
    record = {
        "original_n_layers": int(healing.n_layers),
        "removed_layers": [int(i) for i in np.flatnonzero(~keep)],
        "kept_layers": [int(i) for i in np.flatnonzero(keep)],
        "n_layers": int(keep.sum()),
        "trust_remote_code": form != "fused",
        "healing": {**healing.record(), "saved_form": form},
        **(info or {}),
    }
    write_json(out / PRUNE_INFO_FILE, record)
    return out
