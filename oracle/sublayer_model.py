"""Decoder layers that run some of their sublayers, and causal LMs saved with attention or MLP sublayers removed.

A decoder layer is two residual branches: ``x + post(attn(pre(x)))`` and ``x + post(mlp(pre(x)))`` (``post``: the
post-norm Gemma 2/3 have, absent elsewhere). :class:`SublayerSpec` names the modules of each branch per model
type, :func:`branch` runs one of them as the layer's own forward does, and :class:`PartialDecoderLayer` holds and
runs the kept branch of a layer whose other branch is removed, under the layer's own module names (so state-dict
keys stay ``model.layers.3.mlp.up_proj.weight``).

A pruned model whose layers lose only one of their sublayers is saved with Hugging Face's custom-code
convention: this file (imports torch and transformers only) is copied beside the weights and named in the
config's ``auto_map``; its config classes (``model_type`` ``layershap_sublayer_<base>``) list the layers without
attention (``layershap_no_attention``) and without MLP (``layershap_no_mlp``), and its causal LMs build the
standard architecture, then replace those layers by :class:`PartialDecoderLayer` (the removed modules are
dropped: no weights). A layer without attention holds no KV cache (a ``DummyLayer`` slot). Loading needs
``trust_remote_code=True``; without it the unknown ``model_type`` fails instead of building a wrong model.

Example:
    >>> model = AutoModelForCausalLM.from_pretrained("pruned/", trust_remote_code=True)  # doctest: +SKIP
    >>> model.config.layershap_no_attention  # doctest: +SKIP
    [2, 5]
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers import DynamicCache


@dataclass(frozen=True)
class SublayerSpec:
    """Attribute names of one family's decoder layer: each branch is ``post(module(pre(x)))`` added to ``x``
    (``post`` None: no post-norm)."""

    attn: str
    attn_pre: str
    attn_post: str | None
    mlp: str
    mlp_pre: str
    mlp_post: str | None

    def modules(self, attn: bool) -> tuple[str, ...]:
        """The module names of the attention branch (``attn``) or of the MLP branch."""
        names = (self.attn, self.attn_pre, self.attn_post) if attn else (self.mlp, self.mlp_pre, self.mlp_post)
        return tuple(name for name in names if name is not None)


_PRE_NORM = SublayerSpec("self_attn", "input_layernorm", None, "mlp", "post_attention_layernorm", None)
_GEMMA = SublayerSpec("self_attn", "input_layernorm", "post_attention_layernorm", "mlp",
                      "pre_feedforward_layernorm", "post_feedforward_layernorm")
SPECS: dict[str, SublayerSpec] = {"llama": _PRE_NORM, "mistral": _PRE_NORM, "qwen2": _PRE_NORM, "qwen3": _PRE_NORM,
                                  "gemma2": _GEMMA, "gemma3_text": _GEMMA, "gemma3": _GEMMA}
# model_type -> transformers class-name stem of the text-only causal LM a pruned model is saved as.
SAVED_BASES: dict[str, str] = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
                               "gemma2": "Gemma2", "gemma3_text": "Gemma3Text"}


def branch(layer: nn.Module, spec: SublayerSpec, attn: bool, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """``hidden`` plus ``layer``'s attention branch (``attn``) or MLP branch, as the layer's own forward computes
    it; ``kwargs``: what the decoder loop passed the layer (mask, rotary tables, cache), given to the attention."""
    if attn:
        out = getattr(layer, spec.attn_pre)(hidden)
        out = getattr(layer, spec.attn)(hidden_states=out, **kwargs)[0]
        post = spec.attn_post
    else:
        out = getattr(layer, spec.mlp)(getattr(layer, spec.mlp_pre)(hidden))
        post = spec.mlp_post
    if post is not None:
        out = getattr(layer, post)(out)
    return hidden + out


class PartialDecoderLayer(nn.Module):
    """Decoder layer ``layer`` with one branch removed: holds the kept branch's modules under their own names and
    runs ``x + branch(x)``; a decoder loop reading ``attention_type`` gets the layer's."""

    def __init__(self, layer: nn.Module, spec: SublayerSpec, attn: bool) -> None:
        super().__init__()
        self.spec, self.attn = spec, bool(attn)
        for name in spec.modules(attn):
            setattr(self, name, getattr(layer, name))
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args:
            raise TypeError("PartialDecoderLayer takes hidden_states and keyword arguments only")
        return branch(self, self.spec, self.attn, hidden_states, kwargs)


def partial_layers(model: nn.Module, no_attention: list[int], no_mlp: list[int]) -> None:
    """Replace, in place, the layers listed by :class:`PartialDecoderLayer` (the removed modules and their
    weights are dropped); a layer may be in one list only."""
    spec = SPECS[model.config.model_type.removeprefix("layershap_sublayer_")]
    both = set(no_attention) & set(no_mlp)
    if both:
        raise ValueError(f"layers {sorted(both)} lose both sublayers; delete those layers instead")
    layers = model.model.layers
    for i in no_attention:
        layers[i] = PartialDecoderLayer(layers[i], spec, attn=False)
    for i in no_mlp:
        layers[i] = PartialDecoderLayer(layers[i], spec, attn=True)


class _SublayerConfigMixin:
    """The lists of layers without attention / without MLP (empty by default)."""

    @property
    def cache_config_view(self):
        """A copy of the config whose ``layer_types`` say ``mlp`` for the layers without attention (their KV
        cache slots store nothing)."""
        view = copy.copy(self)
        no_attention = set(getattr(self, "layershap_no_attention", []) or [])
        types = list(getattr(self, "layer_types", None) or ["full_attention"] * self.num_hidden_layers)
        view.layer_types = ["mlp" if i in no_attention else t for i, t in enumerate(types)]
        return view


class SublayerCache(DynamicCache):
    """A ``DynamicCache`` that reads the sequence length from the first layer keeping a cache: a layer without
    attention holds a ``DummyLayer`` slot, which tracks none (transformers 5.25 asks layer 0 only)."""

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx < len(self.layers) and not hasattr(self.layers[layer_idx], "get_seq_length"):
            layer_idx = next((i for i, layer in enumerate(self.layers) if hasattr(layer, "get_seq_length")),
                             len(self.layers))
        return super().get_seq_length(layer_idx)


class _SublayerModelMixin:
    """Builds the standard architecture, then makes the listed layers partial."""

    def _make_partial(self) -> None:
        partial_layers(self, list(getattr(self.config, "layershap_no_attention", []) or []),
                       list(getattr(self.config, "layershap_no_mlp", []) or []))

    def _own_cache(self) -> DynamicCache:
        return SublayerCache(config=self.config.cache_config_view)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if type(model_kwargs.get("cache")) is DynamicCache and model_kwargs["cache"].get_seq_length() == 0:
            model_kwargs["cache"] = self._own_cache()

    def forward(self, *args, **kwargs):
        if kwargs.get("use_cache", self.config.use_cache) and kwargs.get("cache") is None \
                and kwargs.get("past_key_values") is None:
            kwargs["cache"] = self._own_cache()
        return super().forward(*args, **kwargs)


def _classes(stem: str) -> tuple[type, type]:
    base_config = getattr(transformers, f"{stem}Config")
    base_lm = getattr(transformers, f"{stem.removesuffix('Text')}ForCausalLM")
    config_cls = type(f"Sublayer{stem}Config", (_SublayerConfigMixin, base_config),
                      {"model_type": f"layershap_sublayer_{base_config.model_type}", "__module__": __name__})

    def __init__(self, config) -> None:
        base_lm.__init__(self, config)
        self._make_partial()

    lm_cls = type(f"Sublayer{stem}ForCausalLM", (_SublayerModelMixin, base_lm),
                  {"config_class": config_cls, "__init__": __init__, "__module__": __name__})
    return config_cls, lm_cls


def __getattr__(name: str) -> type:
    """``Sublayer<Base>Config`` / ``Sublayer<Base>ForCausalLM``, built on first use (importing this file loads no
    model code); the two classes of a base are built together, so ``config_class`` is the config looked up."""
    for stem in SAVED_BASES.values():
        if name in (f"Sublayer{stem}Config", f"Sublayer{stem}ForCausalLM"):
            config_cls, lm_cls = _classes(stem)
            globals().update({config_cls.__name__: config_cls, lm_cls.__name__: lm_cls})
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
