"""Peer depth-pruning methods, computed on the same calibration windows through the same oracle.

Every method returns which layers to remove for each requested count ``k`` and how many oracle passes it spent:
one pass = one evaluation of the (possibly masked) model over all calibration windows.

- **block influence** (ShortGPT, Men et al. 2024): ``BI_i = 1 - cos(input of layer i, output of layer i)``,
  averaged over tokens; remove the ``k`` layers with the lowest BI. One hidden-states pass.
- **angular distance** (Gromov et al. 2024): ``d(l, k) = arccos(cos(input of layer l, output of layer l+k-1))/pi``
  averaged over tokens (the paper uses the last token only; all tokens are steadier on small calibration
  sets); remove the contiguous block ``l..l+k-1`` with the smallest ``d``. The same single pass serves every k.
- **leave-one-out** (Shortened LLaMA, Kim et al. 2024): calibration NLL with each layer removed alone; remove
  the ``k`` layers whose removal alone hurts least. ``n + 1`` passes (full model + n masks).
- **SLEB** (Song et al. 2024): greedy; repeatedly remove the layer whose removal raises calibration NLL least.
  ``n + (n-1) + ... + (n-k+1)`` passes for k layers.
- **drop-last-k**: remove the last k layers. No pass.
- **random**: k layers drawn uniformly, one draw per seed. No pass.

Example:
    >>> stats = hidden_state_similarity(model, windows)            # one pass over the windows  # doctest: +SKIP
    >>> block_influence(stats)                                      # float64[n]  # doctest: +SKIP
    >>> angular_block(stats, k=3)                                  # (start, distance)  # doctest: +SKIP
    >>> sleb(MaskedEvaluator(model, windows), n_layers=18, k_max=4).removed   # greedy order  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from layershap.core.errors import LayershapError
from layershap.core.masks import check_removal_count, masks_from_removed
from layershap.oracle.layers import find_layers
from layershap.shapley.game import ValueFunction, evaluate


@dataclass(frozen=True)
class Removal:
    """One method's choice of layers to remove at one count ``k``, and the oracle passes it spent to choose."""

    method: str
    k: int
    removed: tuple[int, ...]
    oracle_passes: int
    seed: int | None = None
    extra: dict = field(default_factory=dict)

    def mask(self, n_layers: int) -> np.ndarray:
        """The kept-layer mask ``bool[n_layers]``."""
        return masks_from_removed([self.removed], n_layers)[0]


@dataclass(frozen=True)
class SimilarityStats:
    """Token-averaged similarities between the residual stream before layer ``a`` and before layer ``b``.

    Index ``j`` is the input of layer ``j`` (``j = n`` is the output of the last layer, before the final norm):
    ``cosine[a, b]`` is the mean cosine, ``angular[a, b]`` the mean ``arccos(cos)/pi``.
    """

    cosine: np.ndarray
    angular: np.ndarray
    n_tokens: int
    oracle_passes: int = 1

    @property
    def n_layers(self) -> int:
        return self.cosine.shape[0] - 1


def _first_tensor(value) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


def hidden_state_similarity(
    model: nn.Module,
    windows: np.ndarray | torch.Tensor,
    batch_size: int = 4,
    progress: bool = True,
) -> SimilarityStats:
    """One full-model pass over ``windows``, recording every decoder layer's input and output (float32 stats).

    Layer inputs/outputs are taken with forward hooks on the decoder layers, so the last layer's output is
    the residual stream before the final norm (``output_hidden_states`` would give the normed one there).

    Example:
        >>> stats = hidden_state_similarity(model, windows)  # doctest: +SKIP
        >>> stats.cosine.shape          # (n + 1, n + 1)  # doctest: +SKIP
    """
    handle = find_layers(model)
    n = handle.n_layers
    ids_all = torch.as_tensor(np.asarray(windows), dtype=torch.long)
    if ids_all.ndim != 2:
        raise LayershapError(f"windows must be int[W, L]; got shape {tuple(ids_all.shape)}")
    device = next(model.parameters()).device
    states: list[torch.Tensor | None] = [None] * (n + 1)

    def pre_hook(module, args, kwargs):
        states[0] = args[0] if args else kwargs["hidden_states"]

    def make_hook(i: int):
        def hook(module, args, output):
            states[i + 1] = _first_tensor(output)

        return hook

    hooks = [handle.layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    hooks += [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(handle.layers)]
    cos_sum = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    ang_sum = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    n_tokens = 0
    try:
        with torch.inference_mode():
            starts = range(0, ids_all.shape[0], batch_size)
            for start in tqdm(starts, desc="hidden states", disable=not progress, leave=False):
                ids = ids_all[start : start + batch_size].to(device)
                model.base_model(input_ids=ids, use_cache=False)
                if any(s is None for s in states):
                    raise LayershapError("could not record every decoder layer's input and output")
                h = torch.stack([s.float().reshape(-1, s.shape[-1]) for s in states])  # [n+1, T, H]
                h = torch.nn.functional.normalize(h, dim=-1)
                cos = torch.einsum("ath,bth->abt", h, h).clamp(-1.0, 1.0)
                cos_sum += cos.sum(-1).double().cpu()
                ang_sum += (torch.arccos(cos) / torch.pi).sum(-1).double().cpu()
                n_tokens += h.shape[1]
                states[:] = [None] * (n + 1)
    finally:
        for hk in hooks:
            hk.remove()
    return SimilarityStats((cos_sum / n_tokens).numpy(), (ang_sum / n_tokens).numpy(), n_tokens)


def block_influence(stats: SimilarityStats) -> np.ndarray:
    """ShortGPT block influence per layer, ``1 - mean cos(input_i, output_i)``: ``float64[n]`` (higher = more important).

    Example:
        >>> np.argsort(block_influence(stats))[:k]     # the k layers ShortGPT removes  # doctest: +SKIP
    """
    n = stats.n_layers
    return 1.0 - stats.cosine[np.arange(n), np.arange(n) + 1]


def angular_block(stats: SimilarityStats, k: int) -> tuple[int, float]:
    """Gromov et al.: start ``l`` of the contiguous block of ``k`` layers with the smallest angular distance.

    Example:
        >>> start, dist = angular_block(stats, 4)      # remove layers start .. start + 3  # doctest: +SKIP
    """
    n = stats.n_layers
    check_removal_count(k, n)
    dist = np.array([stats.angular[l, l + k] for l in range(n - k + 1)])
    start = int(np.argmin(dist))
    return start, float(dist[start])


def lowest(scores: np.ndarray, k: int) -> tuple[int, ...]:
    """Indices of the ``k`` lowest scores (ties broken by lower index), sorted."""
    order = np.argsort(np.asarray(scores, dtype=float), kind="stable")
    return tuple(sorted(int(i) for i in order[:k]))


def leave_one_out(value: ValueFunction, n_layers: int) -> tuple[np.ndarray, int]:
    """Leave-one-out importances ``v(full) - v(full without i)`` (with v = -nll: NLL increase), and passes spent.

    Example:
        >>> scores, passes = leave_one_out(MaskedEvaluator(model, windows), 18)   # passes == 19  # doctest: +SKIP
    """
    masks = np.vstack([np.ones((1, n_layers), bool), ~np.eye(n_layers, dtype=bool)])
    values = evaluate(value, masks)
    return values[0] - values[1:], n_layers + 1


@dataclass(frozen=True)
class SlebResult:
    """Greedy removal order, the value after each removal, and the cumulative passes to reach each count."""

    removed: tuple[int, ...]
    values: np.ndarray
    passes: tuple[int, ...]

    def removal(self, k: int) -> tuple[int, ...]:
        return tuple(sorted(self.removed[:k]))


def sleb(value: ValueFunction, n_layers: int, k_max: int, progress: bool = True) -> SlebResult:
    """SLEB: ``k_max`` greedy steps, each removing the layer whose removal keeps the value highest.

    ``value`` maps masks ``bool[k, n]`` to values (higher = better), e.g. a MaskedEvaluator (``-nll``).
    Ties go to the lower layer index.

    Example:
        >>> res = sleb(evaluator, 18, 4); res.removal(2), res.passes[1]    # 2 layers, 18 + 17 passes  # doctest: +SKIP
    """
    check_removal_count(k_max, n_layers)
    kept = np.ones(n_layers, dtype=bool)
    removed: list[int] = []
    values: list[float] = []
    passes: list[int] = []
    spent = 0
    for _ in tqdm(range(k_max), desc="SLEB", disable=not progress, leave=False):
        candidates = np.flatnonzero(kept)
        masks = np.repeat(kept[None, :], candidates.size, axis=0)
        masks[np.arange(candidates.size), candidates] = False
        vals = evaluate(value, masks)
        spent += candidates.size
        best = int(np.argmax(vals))  # first maximum = lowest layer index among ties
        kept[candidates[best]] = False
        removed.append(int(candidates[best]))
        values.append(float(vals[best]))
        passes.append(spent)
    return SlebResult(tuple(removed), np.array(values), tuple(passes))


def drop_last(n_layers: int, k: int) -> tuple[int, ...]:
    """The last ``k`` layers."""
    check_removal_count(k, n_layers)
    return tuple(range(n_layers - k, n_layers))


def random_removal(n_layers: int, k: int, seed: int) -> tuple[int, ...]:
    """``k`` layers drawn uniformly without replacement with ``np.random.default_rng([seed, k])``."""
    check_removal_count(k, n_layers)
    rng = np.random.default_rng([seed, k])
    return tuple(sorted(int(i) for i in rng.choice(n_layers, size=k, replace=False)))


def run_baselines(
    model: nn.Module,
    value: ValueFunction,
    windows: np.ndarray,
    ks: Sequence[int],
    seeds: Sequence[int] = (0, 1, 2),
    batch_size: int = 4,
    progress: bool = True,
) -> list[Removal]:
    """Every baseline at every ``k`` in ``ks``: a list of :class:`Removal` (random: one per seed).

    ``value`` is the oracle value function on the calibration ``windows`` (e.g. a MaskedEvaluator on them);
    the similarity methods use one hidden-states pass over the same windows.

    Example:
        >>> ev = MaskedEvaluator(model, windows)  # doctest: +SKIP
        >>> run_baselines(model, ev, windows, ks=[1, 2, 3, 4])  # doctest: +SKIP
    """
    n = find_layers(model).n_layers
    ks = sorted({int(k) for k in ks})
    for k in ks:
        check_removal_count(k, n)
    out: list[Removal] = []
    stats = hidden_state_similarity(model, windows, batch_size=batch_size, progress=progress)
    bi = block_influence(stats)
    for k in ks:
        out.append(Removal("block influence", k, lowest(bi, k), stats.oracle_passes, extra={"scores": bi.tolist()}))
    for k in ks:
        start, dist = angular_block(stats, k)
        out.append(Removal("angular distance", k, tuple(range(start, start + k)), stats.oracle_passes,
                           extra={"start": start, "distance": dist}))
    loo, loo_passes = leave_one_out(value, n)
    for k in ks:
        out.append(Removal("leave-one-out", k, lowest(loo, k), loo_passes, extra={"scores": loo.tolist()}))
    greedy = sleb(value, n, max(ks), progress=progress)
    for k in ks:
        out.append(Removal("SLEB", k, greedy.removal(k), greedy.passes[k - 1],
                           extra={"calib_nll": float(-greedy.values[k - 1])}))
    for k in ks:
        out.append(Removal("drop-last", k, drop_last(n, k), 0))
    for seed in seeds:
        for k in ks:
            out.append(Removal("random", k, random_removal(n, k, seed), 0, seed=int(seed)))
    return out
