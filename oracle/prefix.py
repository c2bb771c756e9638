"""Prefix sharing: masks that keep the same first layers share the hidden states after them.

A mask's forward pass is determined by its *kept-layer sequence* (e.g. ``(0, 1, 3)``); masks whose sequences share
a prefix share the hidden states after that prefix. :func:`plan_prefix_runs` sorts the distinct sequences
lexicographically (a depth-first walk of their trie) and decides, within a fixed number of cache slots, which prefix
states to keep; :class:`PrefixRunner` executes one step: it runs the model's own backbone with a rebound layer list
whose first entry replays a cached hidden state and whose other entries are the remaining kept layers, some wrapped
to capture their output for later steps. The backbone's embedding, masks and rotary tables are recomputed (cheap);
its loop, per-type attention masks and final norm are the model's own code, so nothing architecture-specific is
re-implemented here.

Example:
    >>> plan = plan_prefix_runs(masks, max_slots=8)  # doctest: +SKIP
    >>> runner = PrefixRunner(model, budget_bytes=512 * 2**20)  # doctest: +SKIP
    >>> for step in plan.steps:  # doctest: +SKIP
    ...     hidden = runner.run(step, input_ids)          # final hidden states (after the final norm)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .families import LayerWrapper
from .layers import bind_layers, find_layers


@dataclass(frozen=True)
class PrefixStep:
    """One backbone run: start from the cached state after ``start`` kept layers, run ``layers``.

    ``row``: row of the plan's unique masks this run finishes. ``evict``: cached depths dropped before the run.
    ``capture``: depths (kept-prefix lengths, > start) whose layer output is cached during the run.
    """

    row: int
    start: int
    layers: tuple[int, ...]
    capture: tuple[int, ...]
    evict: tuple[int, ...]


@dataclass(frozen=True)
class PrefixPlan:
    """Evaluation plan for a batch of masks.

    ``unique``: the distinct masks, ``bool[u, n]``; ``inverse[i]``: row of ``unique`` holding input mask ``i``;
    ``steps``: one per unique mask in depth-first order; ``max_slots``: cache slots the plan never exceeds.
    """

    unique: np.ndarray
    inverse: np.ndarray
    steps: tuple[PrefixStep, ...]
    max_slots: int

    @property
    def layer_runs(self) -> int:
        """Decoder-layer forwards the plan needs (per window batch)."""
        return sum(len(s.layers) for s in self.steps)

    @property
    def plain_layer_runs(self) -> int:
        """Decoder-layer forwards without prefix sharing (one full masked forward per distinct mask)."""
        return int(self.unique.sum())


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def trie_order(masks: np.ndarray) -> np.ndarray:
    """Row indices of ``masks`` in depth-first order of their kept-layer trie (lexicographic kept sequences).

    Cutting this order into consecutive groups keeps masks with long shared prefixes together, so each
    :meth:`MaskedEvaluator.nll` call on a group shares as much work as possible.

    Example:
        >>> trie_order(np.array([[0, 1, 1], [1, 1, 0], [1, 1, 1]], bool)).tolist()
        [1, 2, 0]
    """
    arr = np.asarray(masks, dtype=bool)
    seqs = [tuple(int(j) for j in np.flatnonzero(row)) for row in arr]
    return np.array(sorted(range(len(seqs)), key=lambda r: seqs[r]), dtype=np.int64)


def plan_prefix_runs(masks: np.ndarray, max_slots: int) -> PrefixPlan:
    """Order masks depth-first over their kept-layer trie and decide which prefix states to cache.

    At most ``max_slots`` hidden states are cached at any time, the one a run starts from included; ``max_slots=0``
    gives one full forward per distinct mask. When the slots are short, the prefixes with the largest
    (future uses x depth) are kept.

    Example:
        >>> plan = plan_prefix_runs(np.array([[1, 1, 0], [1, 1, 1]], bool), max_slots=4)
        >>> [(s.start, s.layers, s.capture) for s in plan.steps]
        [(0, (0, 1), (2,)), (2, (2,), ())]
    """
    if max_slots < 0:
        raise ValueError(f"max_slots must be >= 0, got {max_slots}")
    arr = np.asarray(masks, dtype=bool)
    unique, inverse = np.unique(arr, axis=0, return_inverse=True)
    seqs = [tuple(int(j) for j in np.flatnonzero(row)) for row in unique]
    order = sorted(range(len(seqs)), key=lambda r: seqs[r])
    ordered = [seqs[r] for r in order]
    k = len(ordered)
    adjacent = np.array([_lcp(ordered[i], ordered[i + 1]) for i in range(k - 1)], dtype=np.int64)
    # reach[d, i]: masks j > i with lcp(ordered[i], ordered[j]) >= d, i.e. later uses of the state after the first
    # d kept layers of mask i. In lexicographic order lcp(i, j) = min(adjacent[i:j]), so the count runs up to the
    # first adjacent lcp below d.
    depth_max = max((len(s) for s in ordered), default=0)
    reach = np.zeros((depth_max + 2, k), dtype=np.int64)
    positions = np.arange(k - 1)
    for d in range(1, depth_max + 1):
        breaks = np.where(adjacent < d, positions, k - 1)
        reach[d, : k - 1] = np.minimum.accumulate(breaks[::-1])[::-1] - positions

    cached: list[int] = []  # depths cached along the current path, ascending
    steps: list[PrefixStep] = []
    for i, seq in enumerate(ordered):
        uses = reach[:, i]
        prev_lcp = int(adjacent[i - 1]) if i > 0 else 0
        evict = [d for d in cached if d > prev_lcp]
        cached = [d for d in cached if d <= prev_lcp]
        start = cached[-1] if cached else 0
        # Depths past the start where a later mask branches off (the count of later users drops after them).
        candidates = [d for d in range(start + 1, len(seq) + 1) if uses[d] > uses[d + 1]]
        # Slots: the start state is held during the run; the rest go to the most valuable other depths.
        others = [d for d in cached if d != start] + candidates
        free = max_slots - (1 if start > 0 else 0)
        ranked = sorted(others, key=lambda d: (-int(uses[d]) * d, -d))
        chosen = set(ranked[: max(free, 0)])
        dropped = [d for d in cached if d != start and d not in chosen]
        evict += dropped
        capture = tuple(d for d in candidates if d in chosen)
        cached = sorted([d for d in cached if d not in dropped] + list(capture))
        steps.append(PrefixStep(row=order[i], start=start, layers=seq[start:], capture=capture,
                                evict=tuple(sorted(evict))))
    return PrefixPlan(unique=unique, inverse=inverse.reshape(-1), steps=tuple(steps), max_slots=max_slots)


class _Replay(LayerWrapper):
    """Stands in for the first decoder layer of a run: ignores its input, returns a cached hidden state.

    Attribute reads go to ``source``, the layer that produced the state (decoder loops read e.g. its
    ``attention_type``)."""

    def __init__(self, hidden: torch.Tensor, tuple_len: int, source: nn.Module) -> None:
        super().__init__(source)
        self.hidden = hidden
        self.tuple_len = tuple_len

    def forward(self, *args, **kwargs):  # same call signature as any decoder layer
        if self.tuple_len:
            return (self.hidden,) + (None,) * (self.tuple_len - 1)
        return self.hidden


class _Capture(LayerWrapper):
    """Runs a decoder layer and keeps a copy of its output hidden state (first element when it returns a tuple).

    Attribute reads it does not answer itself go to the layer."""

    def __init__(self, layer: nn.Module, sink: list[tuple[torch.Tensor, int]]) -> None:
        super().__init__(layer)
        self.layer = layer
        self.sink = sink

    def forward(self, *args, **kwargs):
        out = self.layer(*args, **kwargs)
        if isinstance(out, tuple):
            self.sink.append((out[0].clone(), len(out)))
        else:
            self.sink.append((out.clone(), 0))
        return out


class PrefixRunner:
    """Executes :class:`PrefixStep` runs of one model on one window batch at a time, holding the prefix cache.

    The cache holds at most ``budget_bytes`` (counted exactly: ``numel x element size`` of every cached tensor);
    ``peak_bytes`` records the most it ever held. Call :meth:`reset` between window batches.
    """

    def __init__(self, model: nn.Module, budget_bytes: int,
                 units: tuple[list[nn.Module], list[int]] | None = None) -> None:
        self.model = model
        self.backbone = model.base_model
        # ``units``: the modules a plan's sequences index and the decoder layer each stands for (the sublayer
        # game's three units per layer, :func:`~layershap.oracle.sublayers.unit_modules`); default: the layers.
        layers = list(find_layers(model).layers)
        self.layers, self.layer_of = units if units is not None else (layers, list(range(len(layers))))
        self.budget_bytes = int(budget_bytes)
        # depth -> (hidden state after that many kept layers, tuple length of the layer output (0 = tensor),
        #           index of the layer that produced it)
        self.cache: dict[int, tuple[torch.Tensor, int, int]] = {}
        self.cache_bytes = 0
        self.peak_bytes = 0

    def reset(self) -> None:
        """Drop every cached state (the next window batch starts from the embeddings)."""
        self.cache.clear()
        self.cache_bytes = 0

    def run(self, step: PrefixStep, input_ids: torch.Tensor) -> torch.Tensor:
        """Run one step on ``input_ids`` ``[B, L]``; returns the backbone's last hidden state ``[B, L, H]``."""
        for d in step.evict:
            tensor, _, _ = self.cache.pop(d)
            self.cache_bytes -= tensor.numel() * tensor.element_size()
        modules: list[nn.Module] = []
        indices: list[int] = []
        if step.start > 0:
            if step.start not in self.cache:
                raise RuntimeError(f"prefix plan starts from depth {step.start}, which is not cached")
            hidden, tuple_len, source = self.cache[step.start]
            modules.append(_Replay(hidden, tuple_len, self.layers[source]))
            indices.append(self.layer_of[source])  # the replay slot stands for the layer that made the state
        sink: list[tuple[torch.Tensor, int]] = []
        capture_at = set(step.capture)
        for offset, layer_index in enumerate(step.layers):
            layer = self.layers[layer_index]
            modules.append(_Capture(layer, sink) if step.start + offset + 1 in capture_at else layer)
            indices.append(self.layer_of[layer_index])
        with bind_layers(self.model, modules, indices):
            out = self.backbone(input_ids=input_ids, use_cache=False).last_hidden_state
        for depth, (tensor, tuple_len) in zip(step.capture, sink, strict=True):
            self.cache[depth] = (tensor, tuple_len, step.layers[depth - step.start - 1])
            self.cache_bytes += tensor.numel() * tensor.element_size()
        self.peak_bytes = max(self.peak_bytes, self.cache_bytes)
        if self.cache_bytes > self.budget_bytes:
            raise RuntimeError(
                f"prefix cache holds {self.cache_bytes} bytes, over its budget of {self.budget_bytes}: planning bug"
            )
        return out
