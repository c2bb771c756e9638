"""A Jamba config and causal LM whose layer pattern is an explicit list instead of period/offset formulas.

Jamba's standard config derives which layers are attention or Mamba layers, and which have a mixture of experts,
from ``attn_layer_period/offset`` and ``expert_layer_period/offset``; after layers are deleted, most kept
patterns fit no such formula. :class:`ExplicitJambaConfig` reads them from ``explicit_layers_block_type`` and
``explicit_layers_num_experts`` instead (and from the formulas when those are absent). This file imports only
transformers: layershap copies it next to such a pruned model and names its classes in ``auto_map``, so
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` rebuilds exactly the kept layers. Its
``model_type`` differs from ``"jamba"``, so loading without ``trust_remote_code`` fails instead of silently
building the formula's layers.

Example:
    >>> config = ExplicitJambaConfig(num_hidden_layers=3, explicit_layers_block_type=["mamba", "mamba", "attention"],
    ...                              explicit_layers_num_experts=[16, 1, 16])
    >>> config.layer_types
    ['linear_attention', 'linear_attention', 'full_attention']
"""

from transformers import JambaConfig, JambaForCausalLM


class ExplicitJambaConfig(JambaConfig):
    """Jamba config with the layer pattern given as lists (see the module docstring)."""

    model_type = "layershap_explicit_jamba"

    @property
    def layers_block_type(self):
        explicit = self.__dict__.get("explicit_layers_block_type")
        return list(explicit) if explicit is not None else JambaConfig.layers_block_type.fget(self)

    @property
    def layers_num_experts(self):
        explicit = self.__dict__.get("explicit_layers_num_experts")
        return list(explicit) if explicit is not None else JambaConfig.layers_num_experts.fget(self)


class ExplicitJambaForCausalLM(JambaForCausalLM):
    """Jamba causal LM built from an :class:`ExplicitJambaConfig`."""

    config_class = ExplicitJambaConfig
