"""The families whose layers know their position: RWKV, Jamba, Bamba and Zamba2 (see :mod:`.families`).

Example:
    >>> Bamba({"bamba": "model.layers"}).narrowed(config, [0, 2, 3])["attn_layer_indices"]   # layer 3 attends  # doctest: +SKIP
    [2]
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layershap.core.errors import UnsupportedModelError

from .family_base import Family, LayerWrapper, text_config


class _EmbeddingNorm(nn.Module):
    """RWKV's embedding norm (``pre_ln`` of block 0) as a list entry of its own, for lists without block 0."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, hidden, state=None, use_cache=False, output_attentions=False):
        return self.norm(hidden), state, None


class Rwkv(Family):
    """RWKV (v4): ``pre_ln`` belongs to the embeddings, blocks run unrescaled while a list is rebound."""

    name = "rwkv"
    index_attrs = ("layer_id",)
    default_type = "linear_attention"

    @staticmethod
    def unrescale(model: nn.Module) -> None:
        """Undo RWKV's inference-time rescaling of the block weights (exact: powers of two)."""
        backbone = model.base_model
        if not backbone.layers_are_rescaled:
            return
        every = backbone.config.rescale_every
        if every > 0:
            with torch.no_grad():
                for block_id, block in enumerate(backbone.blocks):
                    for linear in (block.attention.output, block.feed_forward.value):
                        if hasattr(linear.weight, "SCB") or hasattr(linear.weight, "quant_state"):
                            raise UnsupportedModelError(
                                "this RWKV model is quantized (bitsandbytes) and already rescaled for inference; "
                                "layershap needs its plain weights: load it without quantization"
                            )
                        linear.weight.mul_(2 ** (block_id // every))
        backbone.layers_are_rescaled = False

    @contextlib.contextmanager
    def binding(self, model: nn.Module) -> Iterator[None]:
        backbone = model.base_model
        self.unrescale(model)
        every = backbone.config.rescale_every
        backbone.config.rescale_every = 0  # no rescaling and no halving while the list is rebound
        try:
            yield
        finally:
            backbone.config.rescale_every = every
            backbone.layers_are_rescaled = False  # the weights are unrescaled; the next plain forward rescales

    def bound_modules(self, model: nn.Module, modules: list[nn.Module], kept: Sequence[int]) -> list[nn.Module]:
        if kept and kept[0] == 0:
            return modules
        return [_EmbeddingNorm(model.base_model.blocks[0].pre_ln)] + list(modules)

    def prune(self, model: nn.Module, handle, keep: Sequence[bool]) -> None:
        self.unrescale(model)  # by the original block positions, before any block moves
        norm = handle.layers[0].pre_ln
        super().prune(model, handle, keep)
        first = model.base_model.blocks[0]
        if not hasattr(first, "pre_ln"):
            first.pre_ln = norm  # the embedding norm moves to the new block 0, which applies it


def _period_offset(flags: Sequence[bool], preferred: tuple[int, int]) -> tuple[int, int] | None:
    """``(period, offset)`` with ``flags[i] == (i % period == offset)`` for every i, preferring ``preferred``."""
    n = len(flags)
    candidates = [preferred] + [(p, o) for p in range(1, n + 2) for o in range(p)]
    for period, offset in candidates:
        if 0 <= offset < period and all(f == (i % period == offset) for i, f in enumerate(flags)):
            return period, offset
    return None


def _explicit(config) -> bool:
    """True when a Jamba config carries its layer pattern as explicit lists (:mod:`.explicit_jamba`)."""
    return "explicit_layers_block_type" in config.__dict__


class Jamba(Family):
    """Jamba: the attention and MoE layer patterns are period/offset formulas of the layer index."""

    name = "jamba"

    def narrowed(self, config, kept: Sequence[int]) -> dict[str, Any]:
        block_types = [config.layers_block_type[j] for j in kept]
        experts = [config.layers_num_experts[j] for j in kept]
        values: dict[str, Any] = {"num_hidden_layers": len(kept)}
        attn = _period_offset([t == "attention" for t in block_types],
                              (config.attn_layer_period, config.attn_layer_offset))
        moe = _period_offset([e != 1 for e in experts], (config.expert_layer_period, config.expert_layer_offset))
        if attn is not None and moe is not None and not _explicit(config):
            values.update(attn_layer_period=attn[0], attn_layer_offset=attn[1],
                          expert_layer_period=moe[0], expert_layer_offset=moe[1])
        else:
            values.update(explicit_layers_block_type=block_types, explicit_layers_num_experts=experts)
        return values

    @contextlib.contextmanager
    def configured(self, config, values: dict[str, Any]) -> Iterator[None]:
        from .explicit_jamba import ExplicitJambaConfig

        cls = type(config)
        if "explicit_layers_block_type" in values and not isinstance(config, ExplicitJambaConfig):
            config.__class__ = ExplicitJambaConfig
        try:
            with super().configured(config, values):
                yield
        finally:
            config.__class__ = cls

    def apply(self, config, values: dict[str, Any]) -> None:
        from .explicit_jamba import ExplicitJambaConfig

        if "explicit_layers_block_type" in values and not isinstance(config, ExplicitJambaConfig):
            config.__class__ = ExplicitJambaConfig
        super().apply(config, values)

    @staticmethod
    def custom_code_files() -> dict[str, str]:
        """The custom code a pruned Jamba may need: ``{file name: source}``."""
        from . import explicit_jamba

        return {"explicit_jamba.py": Path(explicit_jamba.__file__).read_text()}

    def custom_code(self, model: nn.Module) -> dict[str, Any] | None:
        if not _explicit(text_config(model)):
            return None
        return {
            "files": self.custom_code_files(),
            "config": {"auto_map": {"AutoConfig": "explicit_jamba.ExplicitJambaConfig",
                                    "AutoModelForCausalLM": "explicit_jamba.ExplicitJambaForCausalLM"}},
        }


class Bamba(Family):
    """Bamba: attention layers are listed by index in ``attn_layer_indices``."""

    name = "bamba"

    def narrowed(self, config, kept: Sequence[int]) -> dict[str, Any]:
        types = config.layers_block_type
        return {"num_hidden_layers": len(kept),
                "attn_layer_indices": [p for p, j in enumerate(kept) if types[j] == "full_attention"]}


class _AtPosition(LayerWrapper):
    """Calls a Zamba2 layer with its original position as ``layer_idx`` (its adapters are chosen by it)."""

    def __init__(self, layer: nn.Module, position: int) -> None:
        super().__init__(layer)
        self.layer = layer
        self.position = position

    def forward(self, hidden_states, original_hidden_states=None, layer_idx=None, *args, **kwargs):
        if "layer_idx" in kwargs:
            kwargs["layer_idx"] = self.position
        return self.layer(hidden_states, original_hidden_states, self.position, *args, **kwargs)


def _smallest_period(seq: Sequence[int]) -> int:
    """Smallest p >= 1 with ``seq[k] == seq[k % p]`` for every k."""
    for p in range(1, len(seq) + 1):
        if all(seq[k] == seq[k % p] for k in range(len(seq))):
            return p
    return 1


class Zamba2(Family):
    """Zamba2: Mamba2 layers and hybrid layers (a shared transformer block + adapters, then a Mamba2 layer)."""

    name = "zamba2"

    def narrowed(self, config, kept: Sequence[int]) -> dict[str, Any]:
        types = list(config.layers_block_type)
        hybrids = [i for i, t in enumerate(types) if t == "hybrid"]
        chosen = set(kept)
        blocks = [ordinal % config.num_mem_blocks for ordinal, i in enumerate(hybrids) if i in chosen]
        new_types = [types[j] for j in kept]
        return {"num_hidden_layers": len(kept), "layers_block_type": new_types,
                "hybrid_layer_ids": [p for p, t in enumerate(new_types) if t == "hybrid"],
                "num_mem_blocks": _smallest_period(blocks) if blocks else config.num_mem_blocks}

    def bound_modules(self, model: nn.Module, modules: list[nn.Module], kept: Sequence[int]) -> list[nn.Module]:
        return [_AtPosition(module, position) for module, position in zip(modules, kept, strict=True)]

    def check_prunable(self, model: nn.Module, keep: Sequence[bool]) -> None:
        inner = model.base_model
        hybrids = [layer for layer in inner.layers if hasattr(layer, "shared_transformer")]
        n_blocks = text_config(model).num_mem_blocks
        for k in range(n_blocks, len(hybrids)):
            first, later = hybrids[k % n_blocks].shared_transformer, hybrids[k].shared_transformer
            if any(p is not q for p, q in zip(first.parameters(), later.parameters(), strict=True)):
                raise UnsupportedModelError(
                    "this Zamba2 model's hybrid layers do not share their transformer blocks (tie_word_embeddings"
                    "=False makes transformers load them untied), so no standard Zamba2 config describes a pruned "
                    "copy; layershap refuses rather than save a model that would load different weights"
                )

    def prune(self, model: nn.Module, handle, keep: Sequence[bool]) -> None:
        config = text_config(model)
        old_blocks = config.num_mem_blocks
        hybrids = [i for i, layer in enumerate(handle.layers) if hasattr(layer, "shared_transformer")]
        kept_ordinals = [ordinal for ordinal, i in enumerate(hybrids) if keep[i]]
        kept = [i for i, k in enumerate(keep) if k]
        position = {i: p for p, i in enumerate(kept)}
        new_positions = [position[hybrids[o]] for o in kept_ordinals]
        n_kept = len(kept_ordinals)
        n_blocks = self.narrowed(config, kept)["num_mem_blocks"]
        # One module per new shared block b (used by kept hybrids k with k % n_blocks == b); hybrid k's adapter
        # sits at index k of its block's adapter lists, real where index % n_blocks == b, identity elsewhere.
        new_blocks: list[nn.Module] = []
        used: set[int] = set()
        for b in range(n_blocks if n_kept else 0):
            block = handle.layers[hybrids[kept_ordinals[b]]].shared_transformer
            members = [k for k in range(n_kept) if k % n_blocks == b]
            for owner, attr in self._adapter_lists(block):
                old = getattr(owner, attr)
                new = nn.ModuleList([old[kept_ordinals[k]] if k in members else nn.Identity()
                                     for k in range(n_kept)])
                setattr(owner, attr, new)
            original = kept_ordinals[b] % old_blocks
            if original in used:  # the same original block serves two new blocks: give this one its own copy
                block = copy.deepcopy(block)
            used.add(original)
            block.block_id = b
            for part in (block.self_attn, block.feed_forward):
                part.block_id = b
                part.num_fwd_mem_blocks = n_kept
                part.layer_dic = {p: k for k, p in enumerate(new_positions)}
            block.self_attn.layer_block_map = list(new_positions)
            new_blocks.append(block)
        for k, ordinal in enumerate(kept_ordinals):
            handle.layers[hybrids[ordinal]].shared_transformer = new_blocks[k % n_blocks]
        super().prune(model, handle, keep)
        inner = model.base_model
        inner.layers_block_type = list(config.layers_block_type)
        inner._tied_weights_keys = {f"layers.{new_positions[k]}.shared_transformer":
                                    f"layers.{new_positions[k % n_blocks]}.shared_transformer"
                                    for k in range(n_blocks, n_kept)}
        # what post_init derives from _tied_weights_keys, for the inner model and the causal LM holding it
        inner.all_tied_weights_keys = inner.get_expanded_tied_weights_keys(all_submodels=False)
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)

    @staticmethod
    def _adapter_lists(block: nn.Module) -> list[tuple[nn.Module, str]]:
        names = [(block.self_attn, "linear_q_adapter_list"), (block.self_attn, "linear_k_adapter_list"),
                 (block.self_attn, "linear_v_adapter_list"), (block.feed_forward, "gate_up_proj_adapter_list")]
        return [(owner, attr) for owner, attr in names if hasattr(owner, attr)]
