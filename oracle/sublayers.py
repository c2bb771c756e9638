"""Attention and MLP sublayers as players: the ``sublayers`` game over ``2n`` players of an ``n``-layer decoder.

Player order: layer ``i``'s attention is player ``2 i``, its MLP player ``2 i + 1`` (names ``"i.attn"``,
``"i.mlp"``). Skipping a sublayer makes its residual contribution zero: the whole normed branch (pre-norm, the
sublayer, and Gemma's post-norm) is not computed and the residual stream passes through unchanged. A layer whose
two sublayers are both skipped leaves the layer list (as in the ``blocks`` game); a layer with one of them kept is
run by :class:`PartialLayer`, which calls the layer's own modules with the arguments the model's decoder loop
passes it (attention mask of the layer's own attention type, rotary tables, cache), so each kept attention keeps
its attention type and rope. No weight is copied.

Supported: the pre-norm transformers Llama, Mistral, Qwen 2, Qwen 3 (``input_layernorm -> self_attn``,
``post_attention_layernorm -> mlp``) and Gemma 2 / 3 (post-norms ``post_attention_layernorm`` and
``post_feedforward_layernorm`` close each branch).

Example:
    >>> names = player_names(2)
    >>> names
    ['0.attn', '0.mlp', '1.attn', '1.mlp']
    >>> with skip_sublayers(model, np.array([True, True, False, True])):   # layer 1 runs its MLP only  # doctest: +SKIP
    ...     out = model(input_ids, use_cache=False)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from layershap.core.errors import LayershapError, UnsupportedModelError
from layershap.core.masks import check_masks

from .families import LayerWrapper
from .layers import bind_layers, find_layers, layer_types
from .sublayer_model import SPECS, SublayerSpec, branch

PLAYERS = ("blocks", "sublayers")
KINDS = ("attn", "mlp")
__all__ = ["KINDS", "PLAYERS", "SPECS", "PartialLayer", "SublayerSpec", "blocks_to_sublayers", "branch",
           "check_players", "player_names", "player_types", "removed_costs", "skip_sublayers", "split_mask",
           "sublayer_costs", "sublayer_spec", "unit_masks", "unit_modules"]


def check_players(players: str) -> str:
    """``players`` when it names a game (``blocks`` or ``sublayers``), else a one-line :class:`LayershapError`."""
    if players not in PLAYERS:
        raise LayershapError(f"unknown players {players!r}; use blocks (whole decoder layers) or sublayers "
                             "(attention and MLP of each layer)")
    return players


def sublayer_spec(model: nn.Module) -> SublayerSpec:
    """The sublayer layout of ``model``'s family; :class:`UnsupportedModelError` for the others."""
    model_type = getattr(model.config, "model_type", None)
    spec = SPECS.get(model_type or "")
    if spec is None:
        raise UnsupportedModelError(
            f"--players sublayers supports model types {', '.join(sorted(SPECS))}, not {model_type!r}; "
            "use --players blocks for it"
        )
    return spec


def player_names(n_layers: int) -> list[str]:
    """Names of the ``2 n_layers`` sublayer players in mask order.

    Example:
        >>> player_names(1)
        ['0.attn', '0.mlp']
    """
    return [f"{i}.{kind}" for i in range(n_layers) for kind in KINDS]


def player_types(model: nn.Module) -> list[str]:
    """Per-player types: an attention player has its layer's attention type, an MLP player ``mlp``."""
    return [t for layer_type in layer_types(model) for t in (layer_type, "mlp")]


def split_mask(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(attention kept, MLP kept)``, ``bool[..., n]`` each, of sublayer masks ``bool[..., 2n]``.

    Example:
        >>> [a.tolist() for a in split_mask(np.array([True, False, False, True]))]
        [[True, False], [False, True]]
    """
    arr = np.asarray(mask, dtype=bool)
    return arr[..., 0::2], arr[..., 1::2]


def blocks_to_sublayers(masks: np.ndarray) -> np.ndarray:
    """Block masks ``bool[k, n]`` as sublayer masks ``bool[k, 2n]`` (a kept block keeps both sublayers).

    Example:
        >>> blocks_to_sublayers(np.array([[True, False]])).astype(int).tolist()
        [[1, 1, 0, 0]]
    """
    return np.repeat(np.asarray(masks, dtype=bool), 2, axis=-1)


def unit_masks(masks: np.ndarray) -> np.ndarray:
    """Sublayer masks ``bool[k, 2n]`` as *unit* masks ``bool[k, 3n]``: unit ``3i`` = layer ``i`` whole, ``3i+1`` =
    its attention only, ``3i+2`` = its MLP only; at most one unit per layer is set. Kept units in increasing order
    are the run's sequence of layer modules, so a trie over them shares prefixes (:mod:`.prefix`).

    Example:
        >>> unit_masks(np.array([[True, True, False, True]])).astype(int).tolist()
        [[1, 0, 0, 0, 0, 1]]
    """
    attn, mlp = split_mask(masks)
    out = np.zeros(attn.shape[:-1] + (attn.shape[-1], 3), dtype=bool)
    out[..., 0] = attn & mlp
    out[..., 1] = attn & ~mlp
    out[..., 2] = ~attn & mlp
    return out.reshape(attn.shape[:-1] + (3 * attn.shape[-1],))


class PartialLayer(LayerWrapper):
    """Runs one sublayer of decoder layer ``layer`` (``attn`` True: the attention branch; else the MLP branch)
    with the layer's own modules; attribute reads it does not answer go to the layer (``attention_type``).

    Example:
        >>> PartialLayer(model.model.layers[0], sublayer_spec(model), attn=False)(hidden)   # hidden + MLP branch  # doctest: +SKIP
    """

    def __init__(self, layer: nn.Module, spec: SublayerSpec, attn: bool) -> None:
        super().__init__(layer)
        object.__setattr__(self, "_spec", spec)
        object.__setattr__(self, "_attn", bool(attn))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if args:
            raise TypeError("a decoder loop passed positional arguments beyond hidden_states; layershap's sublayer "
                            "game needs keyword arguments")
        layer, spec = self._stand_in_for, self._spec
        return branch(layer, spec, self._attn, hidden_states, kwargs)


def unit_modules(model: nn.Module) -> tuple[list[nn.Module], list[int]]:
    """The ``3n`` unit modules of :func:`unit_masks` (layer, attention only, MLP only per layer) and the layer
    each stands for."""
    spec = sublayer_spec(model)
    layers = find_layers(model).layers
    modules: list[nn.Module] = []
    for layer in layers:
        modules += [layer, PartialLayer(layer, spec, attn=True), PartialLayer(layer, spec, attn=False)]
    return modules, [i for i in range(len(layers)) for _ in range(3)]


@contextlib.contextmanager
def skip_sublayers(model: nn.Module, mask: np.ndarray) -> Iterator[None]:
    """Temporarily run ``model`` with only the sublayers where ``mask`` (``bool[2n]``, player order of
    :func:`player_names`) is True; restores the layer list and config on exit, also after an exception."""
    handle = find_layers(model)
    units = unit_masks(check_masks(mask, 2 * handle.n_layers))[0]
    modules, layer_of = unit_modules(model)
    kept = [int(u) for u in np.flatnonzero(units)]
    with bind_layers(model, [modules[u] for u in kept], [layer_of[u] for u in kept]):
        yield


def sublayer_costs(model: nn.Module) -> dict[str, np.ndarray]:
    """What each of the ``2n`` players costs, in player order: ``parameters`` (its branch's weights, norms
    included), ``flops_per_token`` (2 x the weights of its linear projections: the multiply-adds one token
    takes, attention scores over the context left out) and ``kv_cache_bytes_per_token`` (an attention's key and
    value projections' outputs in the weights' dtype; 0 for an MLP), each ``int64[2n]``.

    Example:
        >>> sublayer_costs(model)["parameters"][:2]      # Gemma-3-270M layer 0: attention, MLP  # doctest: +SKIP
        array([1640192, 3933440])
    """
    spec = sublayer_spec(model)
    costs: dict[str, list[int]] = {"parameters": [], "flops_per_token": [], "kv_cache_bytes_per_token": []}
    for layer in find_layers(model).layers:
        for attn in (True, False):
            modules = [getattr(layer, name) for name in spec.modules(attn)]
            costs["parameters"].append(sum(p.numel() for m in modules for p in m.parameters()))
            costs["flops_per_token"].append(2 * sum(sub.weight.numel() for m in modules for sub in m.modules()
                                                    if isinstance(sub, nn.Linear)))
            kv = 0
            if attn:
                module = getattr(layer, spec.attn)
                kv = sum(proj.out_features * proj.weight.element_size() for proj in (module.k_proj, module.v_proj))
            costs["kv_cache_bytes_per_token"].append(kv)
    return {key: np.array(values, dtype=np.int64) for key, values in costs.items()}


def removed_costs(costs: dict[str, np.ndarray], removed: list[int]) -> dict[str, float | int]:
    """Totals of ``costs`` (:func:`sublayer_costs`) over the ``removed`` players, and the parameters' and KV
    cache's shares of the decoder's.

    Example:
        >>> removed_costs(sublayer_costs(model), [0, 6])["parameter_share"]  # doctest: +SKIP
    """
    idx = np.asarray(removed, dtype=np.int64)
    out: dict[str, float | int] = {key: int(values[idx].sum()) for key, values in costs.items()}
    out["parameter_share"] = out["parameters"] / max(int(costs["parameters"].sum()), 1)
    out["kv_cache_share"] = out["kv_cache_bytes_per_token"] / max(int(costs["kv_cache_bytes_per_token"].sum()), 1)
    return out
