"""Training-free healing of a depth-pruned model: one closed-form patch per removed contiguous span.

For a span of removed layers ``s..e-1`` the patch rides on the kept layer ``p = s - 1`` before it. Layer ``p``
returns ``Y + M``: its residual stream ``Y`` plus one branch output ``M`` (the MLP's output on Llama-style blocks,
the post-feed-forward norm's on Gemma 2/3). The dense model then runs the span and reaches ``L_e``; the pruned
model goes straight on from ``L_p = Y + M``. So the *span update* is ``D = L_e - L_p``, and a patch that turns
``M`` into ``M + f(M)`` heals the span when ``f(M) ~ D`` (ReplaceMe's least-squares formulation, with
``T = I + delta``):

- ``bias``: ``f(M) = mean(D)`` over calibration tokens (the span's mean update; Siddiqui et al. 2024);
- ``linear``: ``f(M) = M @ delta``, the ridge least-squares fit ``(G + lam I) delta = M^T D`` with
  ``G = M^T M`` and ``lam = ridge * trace(G) / d`` (shrinks towards the unhealed model);
- ``lowrank:R``: the same fit truncated to rank R where it matters on the data (reduced-rank regression: the
  fitted updates ``M @ delta`` projected onto their top R principal directions), stored as ``down @ up``.

Only ``G``, ``M^T D`` and the sums of ``D`` are accumulated (float64), from hooks on a dense forward pass that
stops after the last span; calibration positions 0 are left out when every window starts with the same token
(a BOS state, identical in every window, would weigh as one huge repeated point).

Example:
    >>> healing = fit_healing(model, windows, removed=[6, 7, 8, 9], method="linear")  # doctest: +SKIP
    >>> with healing_applied(model, healing):               # the healed 14-layer model, in place, reversibly  # doctest: +SKIP
    ...     logits = model(input_ids).logits
    >>> apply_healing(model, healing)                       # for good: layers deleted, patches installed  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from layershap.core.errors import LayershapError
from layershap.core.masks import masks_from_removed
from layershap.oracle.healed_modeling import BASES, HealPatch, install_patch, remove_patch
from layershap.oracle.layers import find_layers, skip_layers
from layershap.oracle.prune import prune_model

from .heal_stats import collect_statistics

METHODS = ("bias", "linear", "lowrank:R", "distill")  # distill: trained, see .distill
DEFAULT_RIDGE = 1e-4  # K = 4 on Gemma-3-270M (benchmarks/healing.py): 1-2 points above 1e-3, 6 above 1e-2
_METHOD = re.compile(r"^(bias|linear|distill|lowrank:(\d+))$")


def parse_method(method: str) -> tuple[str, int | None]:
    """``"bias"`` / ``"linear"`` / ``"lowrank:R"`` -> ``(kind, R)``; anything else is a one-line error.

    Example:
        >>> parse_method("lowrank:16")
        ('lowrank', 16)
    """
    found = _METHOD.match(str(method).strip())
    if found is None:
        raise LayershapError(f"unknown healing method {method!r}; use bias, linear, lowrank:R (e.g. lowrank:32) "
                             "or distill")
    rank = None if found.group(2) is None else int(found.group(2))
    if rank is not None and rank < 1:
        raise LayershapError(f"lowrank:{rank}: the rank must be at least 1, e.g. lowrank:32")
    return ("lowrank" if rank is not None else found.group(1)), rank


def removed_spans(removed: Sequence[int], n_layers: int) -> list[tuple[int, int]]:
    """Maximal runs of consecutive removed layers as ``(start, stop)``, stop exclusive.

    Example:
        >>> removed_spans([7, 8, 9, 12, 16], 18)
        [(7, 10), (12, 13), (16, 17)]
    """
    keep = masks_from_removed(sorted(int(i) for i in removed), n_layers)[0]
    spans, start = [], None
    for i, kept in enumerate([*keep, True]):
        if not kept and start is None:
            start = i
        elif kept and start is not None:
            spans.append((start, i))
            start = None
    return spans


def branch_of(model: nn.Module) -> str:
    """The attribute of a decoder layer whose output a healing patch follows, or a one-line refusal."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in BASES:
        raise LayershapError(
            f"healing supports model types {', '.join(sorted(BASES))}, not {model_type!r}; prune without "
            "healing (layershap prune) for this architecture"
        )
    return BASES[model_type][2]


@dataclass
class SpanFit:
    """The patch fitted for removed layers ``start..stop-1``, carried by kept layer ``start - 1``."""

    start: int
    stop: int
    delta: np.ndarray | None = None
    down: np.ndarray | None = None
    up: np.ndarray | None = None
    bias: np.ndarray | None = None
    explained: float = 0.0  # share of the span update's energy sum ||D||^2 the patch reproduces (calibration)

    @property
    def carrier(self) -> int:
        return self.start - 1

    def patch(self, like: torch.Tensor) -> HealPatch:
        """The fitted patch as a module in ``like``'s dtype and on its device."""
        size = next(a.shape[-1] for a in (self.delta, self.up, self.bias) if a is not None)
        patch = HealPatch(size, linear=self.delta is not None, rank=None if self.up is None else self.up.shape[0],
                          bias=self.bias is not None)
        with torch.no_grad():
            for name in ("delta", "down", "up", "bias"):
                value = getattr(self, name)
                if value is not None:
                    getattr(patch, name).copy_(torch.from_numpy(value))
        return patch.to(device=like.device, dtype=like.dtype)


@dataclass
class Healing:
    """A fitted healing: which layers go, the patch of each span, and what the fit cost."""

    method: str
    n_layers: int
    removed: list[int]
    branch: str
    spans: list[SpanFit]
    n_tokens: int
    seconds: float
    ridge: float = DEFAULT_RIDGE
    extra: dict = field(default_factory=dict)

    @property
    def mask(self) -> np.ndarray:
        return masks_from_removed(self.removed, self.n_layers)[0]

    def record(self) -> dict:
        """JSON-ready summary (saved in ``layershap_prune.json``)."""
        return {"method": self.method, "removed_layers": list(self.removed), "branch": self.branch,
                "spans": [{"layers": list(range(s.start, s.stop)), "carrier_layer": s.carrier,
                           "explained": round(float(s.explained), 6)} for s in self.spans],
                "calibration_tokens": int(self.n_tokens), "fit_seconds": round(self.seconds, 3),
                "ridge": self.ridge, **self.extra}


def _check_spans(spans: list[tuple[int, int]], removed: Sequence[int]) -> None:
    if not spans:
        raise LayershapError("no layer is removed: name the layers to remove (e.g. --remove 7,8)")
    if spans[0][0] == 0:
        raise LayershapError(
            f"layer 0 is removed ({sorted(removed)}): a healing patch rides on the kept layer before each removed "
            "span and none comes before layer 0; keep layer 0, or prune without healing"
        )


def _solve(stat: dict, ridge: float, what: str) -> torch.Tensor:
    g = stat["G"]
    size = g.shape[0]
    lam = ridge * float(torch.trace(g)) / size
    chol, info = torch.linalg.cholesky_ex(g + lam * torch.eye(size, dtype=g.dtype))
    eig = torch.linalg.eigvalsh(g) if lam == 0 else None
    if int(info) != 0 or not torch.isfinite(g).all() or (eig is not None and eig[0] <= 1e-10 * eig[-1]):
        raise LayershapError(
            f"{what}: the activations entering the span are rank-deficient (singular system); use a ridge above "
            "0 (e.g. --ridge 1e-3) or more calibration tokens"
        )
    return torch.cholesky_solve(stat["C"], chol)


def fit_span(stat: dict, n_tokens: int, kind: str, rank: int | None, ridge: float, span: tuple[int, int]) -> SpanFit:
    """The closed-form patch of one span from its :func:`collect_statistics` sums (see the module docstring)."""
    what = f"span {span[0]}..{span[1] - 1}"
    size = stat["G"].shape[0]
    fit = SpanFit(*span)
    energy = max(stat["sum_dd"], 1e-300)
    if kind == "bias":
        mean = stat["sum_d"] / n_tokens
        fit.bias = mean.float().numpy()
        fit.explained = float(n_tokens * (mean @ mean)) / energy
        return fit
    if kind == "linear" and n_tokens < size:
        raise LayershapError(
            f"{what}: {n_tokens} calibration tokens cannot determine a {size} x {size} linear map; use at least "
            f"{size} tokens (more --windows or a longer --seq-len), or lowrank:R with R < {n_tokens}"
        )
    if kind == "lowrank" and not rank < size:
        raise LayershapError(f"lowrank:{rank}: the rank must be below the hidden size {size}; use linear instead")
    if kind == "lowrank" and rank > n_tokens:
        raise LayershapError(
            f"lowrank:{rank}: {n_tokens} calibration tokens are too few for rank {rank}; use a rank <= {n_tokens} "
            "or more calibration tokens (more --windows or a longer --seq-len)"
        )
    delta = _solve(stat, ridge, what)
    if kind == "lowrank":
        fitted = delta.T @ stat["G"] @ delta  # covariance of the fitted updates M @ delta
        _, vecs = torch.linalg.eigh((fitted + fitted.T) / 2)
        top = vecs[:, -rank:]
        down, up = delta @ top, top.T
        fit.down, fit.up = down.float().numpy(), up.float().numpy()
        delta = down @ up
    else:
        fit.delta = delta.float().numpy()
    sse = stat["sum_dd"] - 2 * float((delta * stat["C"]).sum()) + float((delta * (stat["G"] @ delta)).sum())
    fit.explained = 1.0 - sse / energy
    return fit


def fit_healing(model: nn.Module, windows: np.ndarray | torch.Tensor, removed: Sequence[int], method: str,
                ridge: float = DEFAULT_RIDGE, batch_size: int = 4, progress: bool = True) -> Healing:
    """Fit the healing ``method`` for removing ``removed`` from ``model`` on calibration ``windows``.

    Example:
        >>> fit_healing(model, windows, [7, 8], "lowrank:64").spans[0].explained    # share of the update fitted  # doctest: +SKIP
    """
    kind, rank = parse_method(method)
    if kind == "distill":
        raise LayershapError("distill is trained, not fitted in closed form: use layershap.pruning.distill.distill")
    if ridge < 0:
        raise LayershapError(f"--ridge must be 0 or more, got {ridge}")
    n_layers = find_layers(model).n_layers
    removed = sorted(int(i) for i in removed)
    spans = removed_spans(removed, n_layers)
    _check_spans(spans, removed)
    branch = branch_of(model)
    start = time.perf_counter()
    stats, n_tokens = collect_statistics(model, windows, spans, branch, batch_size=batch_size,
                                         progress=progress)
    fits = [fit_span(s, n_tokens, kind, rank, ridge, span) for s, span in zip(stats, spans)]
    return Healing(method=method, n_layers=n_layers, removed=removed, branch=branch, spans=fits,
                   n_tokens=n_tokens, seconds=time.perf_counter() - start, ridge=ridge)


@contextlib.contextmanager
def healing_applied(model: nn.Module, healing: Healing) -> Iterator[nn.Module]:
    """Temporarily run ``model`` as the healed pruned model: removed layers skipped, patches installed.

    Example:
        >>> with healing_applied(model, healing):  # doctest: +SKIP
        ...     nll = model(ids, labels=ids, use_cache=False).loss
    """
    with patches_installed(model, healing), skip_layers(model, healing.mask):
        yield model


@contextlib.contextmanager
def patches_installed(model: nn.Module, healing: Healing) -> Iterator[None]:
    """The healing's patches on their carriers for the block; the removed layers are not skipped here.

    Example:
        >>> with patches_installed(model, healing):  # doctest: +SKIP
        ...     evaluator.nll(healing.mask[None, :])     # the evaluator skips the layers
    """
    layers = find_layers(model).layers
    like = next(model.parameters())
    installed = []
    try:
        for span in healing.spans:
            install_patch(layers[span.carrier], healing.branch, span.patch(like))
            installed.append(span.carrier)
        yield
    finally:
        for index in installed:
            remove_patch(layers[index], healing.branch)


def apply_healing(model: nn.Module, healing: Healing) -> nn.Module:
    """Delete the removed layers of ``model`` in place and install the patches on the kept carriers.

    Example:
        >>> apply_healing(model, healing).config.num_hidden_layers  # doctest: +SKIP
        14
    """
    like = next(model.parameters())
    layers = find_layers(model).layers
    patches = [(layers[s.carrier], s.patch(like)) for s in healing.spans]
    prune_model(model, healing.mask)
    for layer, patch in patches:
        install_patch(layer, healing.branch, patch)
    return model
