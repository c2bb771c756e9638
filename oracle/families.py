"""What differs between architecture families when decoder layers are skipped or deleted.

A :class:`Family` knows, for the model types it covers, where the decoder layer ``ModuleList`` lives, which
config fields describe individual layers (and their values for a chosen sequence of kept layers), what a kept
layer must be told about its position when the list is rebound, and the in-place surgery that deletes layers
for good. :func:`family_of` picks the family of a model: by ``model_type``, else by finding the backbone's one
``ModuleList`` of ``num_hidden_layers`` blocks (:class:`Discovered`), else a refusal that names what is
supported.

The families, and what makes "skip a layer" subtle in each:

* transformers (Llama, Mistral, Qwen 2/3, Gemma 2/3, Phi-3, GPT-2, OPT, GPT-NeoX): ``layer_types`` picks each
  layer's attention mask, so it is narrowed with the list; Qwen's ``max_window_layers`` is recounted on pruning.
* state-space models (Mamba, Mamba2, FalconMamba): ``layer_types`` follows ``num_hidden_layers``; cache slots
  follow ``layer_idx``, renumbered on pruning.
* RWKV: block 0 also holds the embedding norm (``pre_ln``), which is never removed with it; the ``rescale_every``
  trick (block weights divided by ``2 ** (block index // rescale_every)`` at inference, hidden state halved every
  ``rescale_every`` blocks, to keep fp16 in range) depends on block positions, so masked evaluation runs the
  unrescaled blocks and pruning saves unrescaled weights; recurrent-state slots follow ``layer_id``.
* Jamba: the attention / Mamba and MoE / MLP layer patterns are period/offset formulas; a kept pattern that no
  formula gives is stored as explicit lists by :mod:`.explicit_jamba` (saved as custom code).
* Bamba: attention layers are listed in ``attn_layer_indices``, renumbered.
* Zamba2: ``hybrid`` layers share transformer blocks (hybrid layer k uses shared block k mod ``num_mem_blocks``)
  and pick their adapters by their position in the layer list, which the decoder loop passes to every layer;
  masked evaluation passes each kept layer its original position, pruning rebuilds the block cycle.

Example:
    >>> family_of(model).name, family_of(model).layer_path(model)  # doctest: +SKIP
    ('transformer', 'model.layers')
"""

from __future__ import annotations

import functools
import re
import warnings

from torch import nn

from layershap.core.errors import UnsupportedModelError

from .family_base import Family, LayerWrapper, StateSpace, Transformer, is_derived, resolve, text_config
from .healed_modeling import BASES as HEALED_BASES
from .hybrid_families import Bamba, Jamba, Rwkv, Zamba2

__all__ = ["FAMILIES", "LAYER_PATHS", "Family", "LayerWrapper", "family_of", "resolve", "supported_types",
           "text_config"]


# Config keys that name or count per-layer structure; a model found generically must have none of them.
_PER_LAYER_KEY = re.compile(r"layer|every|interval|period|offset|pattern|sparse_step|dense_replace|_idxs")
_HARMLESS_KEYS = {"num_hidden_layers", "layer_types", "layer_norm_eps", "layer_norm_epsilon", "layerdrop",
                  "num_layers", "n_layer", "architectures"}


class Discovered(Family):
    """A model type layershap has no entry for, whose layer list was found generically; its config has no
    per-layer fields besides ``layer_types``, so narrowing those is all that skipping needs."""

    name = "found generically"

    def __init__(self, path: str) -> None:
        super().__init__({})
        self.path = path

    def layer_path(self, model: nn.Module) -> str:
        return self.path


FAMILIES: tuple[Family, ...] = (
    Transformer({"llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers",
                 "qwen3": "model.layers", "gemma2": "model.layers", "gemma3_text": "model.layers",
                 "gemma3": "model.language_model.layers", "phi3": "model.layers", "gpt2": "transformer.h",
                 "opt": "model.decoder.layers", "gpt_neox": "gpt_neox.layers",
                 # healed depth-pruned models saved as custom code (oracle/healed_modeling.py)
                 **{f"layershap_healed_{t}": "model.layers" for t in HEALED_BASES}}),
    StateSpace({"mamba": "backbone.layers", "mamba2": "backbone.layers", "falcon_mamba": "backbone.layers"}),
    Rwkv({"rwkv": "rwkv.blocks"}),
    Jamba({"jamba": "model.layers", "layershap_explicit_jamba": "model.layers"}),
    Bamba({"bamba": "model.layers"}),
    Zamba2({"zamba2": "model.layers"}),
)
# model_type -> dotted path of the decoder layer ModuleList from the causal LM object.
LAYER_PATHS: dict[str, str] = {t: p for family in FAMILIES for t, p in family.paths.items()}
_BY_TYPE: dict[str, Family] = {t: family for family in FAMILIES for t in family.paths}
_warned: set[str] = set()


def supported_types() -> str:
    return ", ".join(sorted(LAYER_PATHS))


@functools.lru_cache(maxsize=1)
def _installed_transformers() -> str:
    from importlib.metadata import version

    return version("transformers")


@functools.lru_cache(maxsize=1)
def _required_transformers() -> str | None:
    """The transformers specifier layershap's package metadata declares (pyproject.toml), if installed."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    try:
        lines = requires("layershap") or []
    except PackageNotFoundError:
        return None
    specs = [str(r.specifier) for r in map(Requirement, lines) if r.name == "transformers" and r.marker is None]
    return specs[0] if specs else None


@functools.lru_cache(maxsize=8)
def _allowed(required: str, found: str) -> bool:
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(required).contains(found, prereleases=True)


def check_transformers() -> None:
    """Refuse a transformers release older than the one the families are written and tested for."""
    required = _required_transformers()
    found = _installed_transformers()
    if required and not _allowed(required, found):
        raise UnsupportedModelError(
            f"layershap needs transformers{required} to skip decoder layers, found {found} (older releases "
            f"build several architectures differently); upgrade it: pip install 'transformers{required}'"
        )


def family_of(model: nn.Module) -> Family:
    """The family of ``model``: by ``model_type``, else found generically, else :class:`UnsupportedModelError`."""
    check_transformers()
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    family = _BY_TYPE.get(model_type or "")
    if family is not None:
        return family
    path, problem = _discover(model)
    if path is None:
        raise UnsupportedModelError(
            f"layershap does not know how to skip the decoder layers of model_type={model_type!r} "
            f"(class {type(model).__name__}): {problem}. Supported model types: {supported_types()}; other "
            "decoders are taken when their backbone holds one ModuleList of num_hidden_layers blocks and their "
            "config has no per-layer fields besides layer_types."
        )
    if model_type not in _warned:
        _warned.add(model_type)
        warnings.warn(
            f"model_type={model_type!r} is not among the model types layershap tests; its decoder layers were "
            f"found at {path} and are skipped by narrowing num_hidden_layers / layer_types only",
            stacklevel=3,
        )
    return Discovered(path)


def _discover(model: nn.Module) -> tuple[str | None, str]:
    """``(dotted path, "")`` of the decoder layer list found generically, or ``(None, why not)``."""
    config = getattr(model, "config", None)
    if config is None:
        return None, "it has no config"
    config = text_config(model)
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        return None, "its config has no num_hidden_layers"
    base = getattr(model, "base_model_prefix", "") or ""
    roots = [base] if base and hasattr(model, base) else []
    roots += [f"{r}.language_model" for r in list(roots) if hasattr(resolve(model, r), "language_model")]
    found = []
    for root in roots:
        for name, child in resolve(model, root).named_children():
            if isinstance(child, nn.ModuleList) and len(child) == n and all(
                    any(True for _ in layer.parameters()) for layer in child):
                found.append(f"{root}.{name}")
    if len(found) != 1:
        return None, ("its backbone has no ModuleList of num_hidden_layers blocks" if not found else
                      f"its backbone has several candidate layer lists ({', '.join(found)})")
    if getattr(config, "is_heterogeneous", False):
        return None, "its config gives individual layers their own settings (per_layer_config)"
    from transformers import PretrainedConfig

    own_properties = {k for cls in type(config).__mro__ if issubclass(cls, PretrainedConfig)
                      and cls is not PretrainedConfig for k, v in vars(cls).items() if isinstance(v, property)}
    for key in sorted((set(config.to_dict()) | own_properties) - _HARMLESS_KEYS):
        try:
            value = getattr(config, key, None)
        except Exception as err:  # noqa: BLE001 - any field we cannot read is one we cannot vouch for
            return None, f"its config field {key!r} cannot be read ({type(err).__name__})"
        per_layer = isinstance(value, (list, tuple)) and len(value) == n
        named = (_PER_LAYER_KEY.search(key) is not None and not key.startswith("_")
                 and value is not None and value is not False and value != 0 and value != [] and value != ())
        if per_layer or named:
            return None, f"its config field {key!r} describes individual layers, which layershap cannot narrow"
    if is_derived(config, "layer_types") and len(set(config.layer_types or [])) > 1:
        return None, "its layer_types are computed from other config fields"
    return found[0], ""
