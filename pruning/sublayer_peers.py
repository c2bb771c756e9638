"""Peer methods of the sublayer game (players: entry ``2i`` = layer ``i``'s attention, ``2i + 1`` its MLP).

- **BlockPruner** (Zhong et al. 2024, arXiv 2406.10594): greedy over the ``2n`` sublayers; each step removes the
  sublayer whose removal keeps calibration perplexity lowest (SLEB's search, :func:`~.baselines.sleb`, on the
  sublayer game). ``2n + (2n - 1) + ... + (2n - k + 1)`` passes for k sublayers.
- **attention drop** (He et al. 2024, arXiv 2406.15786, "What matters in transformers?"): the importance of layer
  ``i``'s attention is ``1 - cos(X, Y)``, ``X`` the residual stream entering it and ``Y = X + attention branch``,
  averaged over tokens; drop the ``k`` attentions of lowest importance. One pass.

Example:
    >>> imp = attention_importance(model, windows)                  # float64[n], one pass  # doctest: +SKIP
    >>> attention_drop(imp, 3)                                      # players (2i) of the 3 least important  # doctest: +SKIP
    >>> blockpruner(MaskedEvaluator(model, windows, players="sublayers"), 2 * n, 4).removal(4)  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from layershap.core.errors import LayershapError
from layershap.core.masks import check_removal_count
from layershap.oracle.layers import find_layers
from layershap.oracle.sublayers import branch, sublayer_spec
from layershap.shapley.game import ValueFunction

from .baselines import SlebResult, sleb


def attention_importance(model: nn.Module, windows: np.ndarray | torch.Tensor, batch_size: int = 4,
                         progress: bool = True) -> np.ndarray:
    """``1 - mean cos(X, X + attention branch)`` per layer, ``float64[n]``, from one full-model pass (each
    layer's attention branch is run once more on the input its layer received, with the same mask and rope).

    Example:
        >>> attention_importance(model, windows).argsort()[:3]      # the 3 most droppable attentions  # doctest: +SKIP
    """
    spec = sublayer_spec(model)
    handle = find_layers(model)
    ids_all = torch.as_tensor(np.asarray(windows), dtype=torch.long)
    if ids_all.ndim != 2:
        raise LayershapError(f"windows must be int[W, L]; got shape {tuple(ids_all.shape)}")
    device = next(model.parameters()).device
    cos_sum = torch.zeros(handle.n_layers, dtype=torch.float64)
    n_tokens = 0

    def make_hook(i: int):
        def hook(layer, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            y = branch(layer, spec, True, x, rest)
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            cos_sum[i] += cos.sum().double().cpu()

        return hook

    hooks = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(handle.layers)]
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, ids_all.shape[0], batch_size), desc="attention similarity",
                              disable=not progress, leave=False):
                ids = ids_all[start : start + batch_size].to(device)
                model.base_model(input_ids=ids, use_cache=False)
                n_tokens += ids.numel()
    finally:
        for hk in hooks:
            hk.remove()
    return 1.0 - (cos_sum / n_tokens).numpy()


def attention_drop(importance: np.ndarray, k: int) -> tuple[int, ...]:
    """The players (``2i``) of the ``k`` attentions of lowest ``importance`` (ties: lower layer first).

    Example:
        >>> attention_drop(np.array([0.3, 0.1, 0.2]), 2)
        (2, 4)
    """
    check_removal_count(k, len(importance))
    order = np.argsort(np.asarray(importance), kind="stable")[:k]
    return tuple(sorted(2 * int(i) for i in order))


def blockpruner(value: ValueFunction, n_players: int, k_max: int, progress: bool = True) -> SlebResult:
    """BlockPruner's greedy removal of ``k_max`` sublayers: ``value`` maps sublayer masks ``bool[k, n_players]``
    to values (higher = better, e.g. ``MaskedEvaluator(..., players="sublayers")``).

    Example:
        >>> blockpruner(evaluator, 36, 6).removal(6)  # doctest: +SKIP
    """
    if n_players % 2:
        raise LayershapError(f"a sublayer game has an even number of players (attention, MLP per layer), not "
                             f"{n_players}")
    return sleb(value, n_players, k_max, progress=progress)
