"""Heal-aware measurement: the loss of a removal set *after* its training-free recovery, for plans chosen for
the healed model (``layershap plan --heal linear``).

One dense pass over the healing's own calibration windows records every decoder layer's branch output ``M``
and output ``H`` (:class:`DenseStates`); the sums a span's closed-form fit needs (:mod:`.heal_stats`) then come
from two matrix products, so fitting a candidate set costs no model pass (:class:`SpanFitter`, fits cached per
span). :class:`HealedEvaluator` measures each mask of a group with its patches installed and its layers
skipped, through the same masked evaluator as every other measurement; a span that starts at layer 0 has no
kept layer to carry a patch and is measured unhealed.

Example:
    >>> fitter = SpanFitter(model, heal_windows, "linear")  # doctest: +SKIP
    >>> healed = HealedEvaluator(MaskedEvaluator(model, windows), fitter)  # doctest: +SKIP
    >>> healed.loss(masks_from_removed([6, 7, 8, 9], 18))   # nll of the healed 14-layer model  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from layershap.core.errors import LayershapError
from layershap.core.masks import check_masks
from layershap.oracle.evaluate import MaskedEvaluator
from layershap.oracle.layers import find_layers
from layershap.oracle.measurement import Measurement
from layershap.oracle.text import windows_sha256

from .heal import (
    DEFAULT_RIDGE,
    Healing,
    SpanFit,
    branch_of,
    fit_span,
    parse_method,
    patches_installed,
    removed_spans,
)


class DenseStates:
    """Every decoder layer's branch output ``M[i]`` and output ``H[i]`` (float32 ``[T, hidden]``) of the dense
    model on ``windows``; the first position is left out when every window starts with the same token (BOS),
    as the healing fit does."""

    def __init__(self, model: nn.Module, windows: np.ndarray, branch: str, batch_size: int = 4) -> None:
        layers = find_layers(model).layers
        ids = torch.as_tensor(np.asarray(windows), dtype=torch.long)
        skip_first = ids.shape[1] > 1 and bool((ids[:, 0] == ids[0, 0]).all())
        device = next(model.parameters()).device
        parts: dict[tuple[str, int], list[torch.Tensor]] = {}

        def keep(kind: str, i: int):
            def hook(module, args, out):
                x = out[0] if isinstance(out, tuple) else out
                x = x[:, 1:] if skip_first else x
                parts.setdefault((kind, i), []).append(x.detach().reshape(-1, x.shape[-1]).float())
            return hook

        hooks = [h for i, layer in enumerate(layers) for h in (
            getattr(layer, branch).register_forward_hook(keep("M", i)), layer.register_forward_hook(keep("H", i)))]
        try:
            with torch.inference_mode():
                for b in range(0, ids.shape[0], batch_size):
                    model.base_model(input_ids=ids[b : b + batch_size].to(device), use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        self.M = [torch.cat(parts[("M", i)]) for i in range(len(layers))]
        self.H = [torch.cat(parts[("H", i)]) for i in range(len(layers))]
        self.n_tokens = int(self.M[0].shape[0])

    def span_statistics(self, start: int, stop: int) -> dict:
        """The sums :func:`~layershap.pruning.heal.fit_span` takes for removed layers ``start..stop-1``:
        ``G = M^T M``, ``C = M^T D``, ``sum D`` and ``sum ||D||^2`` with ``M`` the carrier's (layer ``start - 1``)
        branch output and ``D = H[stop - 1] - H[start - 1]`` (float64, on the CPU)."""
        m = self.M[start - 1].double()
        d = self.H[stop - 1].double() - self.H[start - 1].double()
        return {"G": (m.T @ m).cpu(), "C": (m.T @ d).cpu(), "sum_d": d.sum(0).cpu(), "sum_dd": float((d * d).sum())}


class SpanFitter:
    """Closed-form healing fits of any removal set from one dense pass over ``windows`` (cached per span).

    Example:
        >>> SpanFitter(model, windows, "linear").healing([7, 8]).spans[0].explained  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, windows: np.ndarray, method: str, ridge: float = DEFAULT_RIDGE,
                 batch_size: int = 4) -> None:
        self.kind, self.rank = parse_method(method)
        if self.kind == "distill":
            raise LayershapError("--heal distill trains for minutes per set; heal-aware plans use bias, linear or "
                                 "lowrank:R (distill the chosen plan afterwards with layershap heal)")
        self.model, self.method, self.ridge = model, method, float(ridge)
        self.windows = np.asarray(windows)
        self.branch = branch_of(model)
        self.n_layers = find_layers(model).n_layers
        self.batch_size = batch_size
        self._states: DenseStates | None = None
        self._fits: dict[tuple[int, int], SpanFit] = {}

    @property
    def states(self) -> DenseStates:
        if self._states is None:
            self._states = DenseStates(self.model, self.windows, self.branch, self.batch_size)
        return self._states

    def identity(self) -> str:
        """What a store of healed rows records: method, ridge and the fit windows' hash."""
        return f"{self.method};ridge={self.ridge:g};fit={windows_sha256(self.windows)[:16]}x{self.windows.shape[0]}"

    def healing(self, removed: Sequence[int]) -> Healing:
        """The fitted :class:`~layershap.pruning.heal.Healing` of ``removed`` (spans from layer 0 unpatched)."""
        removed = sorted(int(i) for i in removed)
        fits = []
        for span in removed_spans(removed, self.n_layers) if removed else []:
            if span[0] == 0:
                continue
            if span not in self._fits:
                stats = self.states.span_statistics(*span)
                self._fits[span] = fit_span(stats, self.states.n_tokens, self.kind, self.rank, self.ridge, span)
            fits.append(self._fits[span])
        return Healing(method=self.method, n_layers=self.n_layers, removed=removed, branch=self.branch,
                       spans=fits, n_tokens=self.states.n_tokens, seconds=0.0, ridge=self.ridge)


class HealedEvaluator:
    """A :class:`~layershap.oracle.evaluate.MaskedEvaluator` whose masks are measured healed: per mask, the
    fitter's patches installed, the mask's layers skipped (one mask per inner call: no prefix is shared between
    differently patched models). Same interface: ``measure``, ``loss``, ``nll``, ``n_layers``, ``utility`` ...

    Example:
        >>> HealedEvaluator(evaluator, SpanFitter(model, heal_windows, "bias")).loss(masks)  # doctest: +SKIP
    """

    def __init__(self, evaluator: MaskedEvaluator, fitter: SpanFitter) -> None:
        if evaluator.players != "blocks":
            raise LayershapError("heal-aware plans work on whole blocks; drop --heal for --players sublayers")
        if evaluator.utility == "kl":
            evaluator.reference()  # the dense distributions, before any patch is installed
        self.inner, self.fitter = evaluator, fitter

    def __getattr__(self, name: str):  # n_layers, n_windows, n_tokens, utility, device, players, top_k, ...
        return getattr(self.inner, name)

    def measure(self, masks: np.ndarray) -> Measurement:
        arr = check_masks(masks, self.inner.n_layers)
        parts = []
        for mask in arr:
            healing = self.fitter.healing(np.flatnonzero(~mask).tolist())
            with patches_installed(self.inner.model, healing):
                parts.append(self.inner.measure(mask[None, :]))
        kl = None if parts[0].kl is None else np.concatenate([p.kl for p in parts])
        return Measurement(np.concatenate([p.nll for p in parts]), kl)

    def loss(self, masks: np.ndarray) -> np.ndarray:
        return self.measure(masks).loss(self.inner.utility)

    def nll(self, masks: np.ndarray) -> np.ndarray:
        return self.measure(masks).loss("nll")

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        return -self.loss(masks)
