"""Healing patches as real modules, and the custom-code causal LMs that carry them after depth pruning.

A healed depth-pruned model is the pruned model plus one :class:`HealPatch` per removed contiguous span, acting
on the output of one *branch* of the kept layer just before the span (the MLP's output ``M`` on Llama-style
pre-norm blocks; the post-feed-forward norm's output on Gemma 2/3). The layer then returns
``residual + patch(M)`` with ``patch(M) = M + M @ delta + bias`` (``delta`` full, or ``down @ up`` of rank R,
each part optional). The patch is a submodule of the branch, ``<branch>.layershap_heal``, so every original
weight keeps its ``state_dict`` key.

This file imports only torch and transformers: layershap copies it next to a healed model that the standard
architecture cannot express, and names one of its ``Healed*`` classes in the config's ``auto_map``, so
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` rebuilds the patches from the config's
``layershap_heal`` field (``{"branch": ..., "patches": {kept layer index: {"rank": ..., "linear": ...,
"bias": ...}}}``) with no layershap installed. Each ``model_type`` differs from the base one, so loading without
``trust_remote_code`` fails instead of silently dropping the patches.

Example:
    >>> patch = HealPatch(hidden_size=4, linear=True, bias=True)
    >>> install_patch(model.model.layers[2], "mlp", patch)      # layer 2's MLP output now goes through it  # doctest: +SKIP
"""

import torch
import transformers
from torch import nn

HEAL_ATTR = "layershap_heal"
# model_type -> (config class, causal LM class, the branch whose output a patch follows)
BASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "mlp"),
    "mistral": ("MistralConfig", "MistralForCausalLM", "mlp"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "mlp"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "mlp"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "mlp"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "post_feedforward_layernorm"),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", "post_feedforward_layernorm"),
}


class HealPatch(nn.Module):
    """``x -> x + x @ delta + (x @ down) @ up + bias`` over the last dimension (each term only when built).

    Example:
        >>> HealPatch(8, rank=2)(torch.ones(1, 8)).shape
        torch.Size([1, 8])
    """

    def __init__(self, hidden_size: int, linear: bool = False, rank: int | None = None, bias: bool = False):
        super().__init__()
        self.hidden_size, self.rank = int(hidden_size), rank
        self.delta = nn.Parameter(torch.zeros(hidden_size, hidden_size)) if linear else None
        self.down = nn.Parameter(torch.zeros(hidden_size, rank)) if rank else None
        self.up = nn.Parameter(torch.zeros(rank, hidden_size)) if rank else None
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None

    def spec(self) -> dict:
        """What :meth:`from_spec` rebuilds this patch's shape from (stored in the config)."""
        return {"hidden_size": self.hidden_size, "linear": self.delta is not None, "rank": self.rank,
                "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict) -> "HealPatch":
        return cls(spec["hidden_size"], linear=spec["linear"], rank=spec["rank"], bias=spec["bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.delta is not None:
            out = out + x @ self.delta.to(x.dtype)
        if self.down is not None:
            out = out + (x @ self.down.to(x.dtype)) @ self.up.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out


class _Patched:
    """Mixin put in front of a branch module's class: its output goes through ``self.layershap_heal``."""

    def forward(self, *args, **kwargs):
        return getattr(self, HEAL_ATTR)(super().forward(*args, **kwargs))


_PATCHED_CLASSES: dict[type, type] = {}


def install_patch(layer: nn.Module, branch: str, patch: HealPatch) -> nn.Module:
    """Make ``layer.<branch>`` return ``patch(its output)``; the patch becomes ``<branch>.layershap_heal``."""
    module = getattr(layer, branch)
    if hasattr(module, HEAL_ATTR):
        raise RuntimeError(f"{branch} of this layer already carries a healing patch")
    base = type(module)
    patched = _PATCHED_CLASSES.setdefault(base, type(f"Healed{base.__name__}", (_Patched, base), {}))
    module.add_module(HEAL_ATTR, patch)
    module.__class__ = patched
    return module


def remove_patch(layer: nn.Module, branch: str) -> HealPatch:
    """Undo :func:`install_patch`; returns the patch that was removed."""
    module = getattr(layer, branch)
    patch = getattr(module, HEAL_ATTR)
    module.__class__ = next(c for c in type(module).__mro__[1:] if not issubclass(c, _Patched))
    delattr(module, HEAL_ATTR)
    return patch


def install_from_config(model: nn.Module, config) -> None:
    """Build the zero-initialised patches that ``config.layershap_heal`` describes on ``model.model.layers``."""
    heal = getattr(config, HEAL_ATTR, None) or {}
    layers = model.model.layers
    for index, spec in heal.get("patches", {}).items():
        install_patch(layers[int(index)], heal["branch"], HealPatch.from_spec(spec))


def _healed_classes(model_type: str) -> tuple[type, type]:
    config_name, model_name, _ = BASES[model_type]
    base_config, base_model = getattr(transformers, config_name), getattr(transformers, model_name)
    config_cls = type(f"Healed{config_name}", (base_config,), {
        "model_type": f"layershap_healed_{model_type}",
        "__doc__": f"{config_name} of a depth-pruned model with healing patches (``layershap_heal``).",
    })

    def __init__(self, config):
        base_model.__init__(self, config)
        install_from_config(self, config)

    model_cls = type(f"Healed{model_name}", (base_model,), {
        "config_class": config_cls, "__init__": __init__,
        "__doc__": f"{model_name} whose kept layers carry the healing patches its config names.",
    })
    return config_cls, model_cls


for _type in BASES:
    _config_cls, _model_cls = _healed_classes(_type)
    globals()[_config_cls.__name__] = _config_cls
    globals()[_model_cls.__name__] = _model_cls
del _type, _config_cls, _model_cls
