"""The service's queries on one loaded surrogate, as JSON-ready documents — and the ONE module of
``layershap.serve`` that imports the rest of the library (so a package restructure renames imports here only).

Every function takes a :class:`Surrogate` and plain parameters already checked against the server's
:class:`Limits`, calls the library function the CLI uses for the same job, and returns a dict of plain JSON types
whose content depends only on (surrogate, parameters): timings are left out so that the same query always
gives the same bytes.

Example:
    >>> sur = load_surrogate("artifacts/gemma-3-270m/surrogate")  # doctest: +SKIP
    >>> predict_document(sur, np.ones((1, 18), bool))["perplexity"]  # doctest: +SKIP
    >>> scores_document(sur, resolve_index(sur, "semivalue", "1:9"), "auto", None, 0, "gemma-3-270m")["ranking"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from layershap.core.errors import LayershapError, MaskError
from layershap.core.jsonio import jsonable
from layershap.pruning.search import Candidate, best_removal_sets
from layershap.pruning.sparsity import export_document
from layershap.shapley.estimate import DEFAULT_BUDGET, ensemble_scores, resolve_method
from layershap.shapley.exact import exact_interactions
from layershap.shapley.game import Scores
from layershap.shapley.scores_io import ScoresRecord, scores_record
from layershap.shapley.semivalues import Index, choose_index, coverage_report, uncovered_counts
from layershap.surrogate.checkpoint import METADATA_FILE, Surrogate, load_surrogate
from layershap.surrogate.metrics import not_validated


def scores_from_dict(doc: dict) -> Scores:
    """The library's :class:`Scores` of a scores document."""
    return ScoresRecord.from_dict(doc).scores


__all__ = [
    "METADATA_FILE", "Candidate", "LayershapError", "Limits", "MaskError", "Scores", "Surrogate", "dumps",
    "interactions_document", "jsonable", "load_surrogate", "predict_document", "removal_k", "removal_sets_document",
    "resolve_index", "resolve_scores_method", "scores_document", "scores_from_dict", "sparsities_document",
]

INDEX_KINDS = ("auto", "shapley", "banzhaf", "semivalue")
TIMING_KEYS = ("seconds",)  # nondeterministic fields left out of served documents


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask of the server (the request is refused with a 4xx above them).

    Example:
        >>> Limits(max_masks=1024).max_masks
        1024
    """

    max_body_bytes: int = 8 << 20
    max_masks: int = 65_536
    max_exact_layers: int = 20  # exact enumeration: 2^20 masks x (members + 1) networks, seconds on a CPU
    max_budget: int = DEFAULT_BUDGET  # Monte Carlo value-function evaluations per estimate
    max_exhaustive: int = 1_000_000  # removal sets searched exhaustively; above: beam search
    max_beam_width: int = 256
    max_top: int = 50


def dumps(doc: Any) -> bytes:
    """Canonical JSON bytes of a document (compact, no NaN: non-finite numbers become null)."""
    return json.dumps(jsonable(doc), allow_nan=False, separators=(",", ":")).encode()


def predict_document(sur: Surrogate, masks: np.ndarray) -> dict:
    """Ensemble mean loss, member spread and (an nll surrogate) perplexity = exp(nll) for ``bool[k, n]`` masks;
    ``utility`` names the loss (``nll`` or ``kl``: the KL to the dense model, which has no perplexity).

    Example:
        >>> predict_document(sur, np.ones((1, sur.n_layers), bool))["nll"]  # doctest: +SKIP
    """
    mean, std = sur.predict(masks)
    doc = {"model_id": sur.metadata.get("model_id"), "n_layers": sur.n_layers, "members": sur.members,
           "utility": sur.utility}
    if sur.utility != "nll":
        return {**doc, "loss": mean, "loss_std": std}
    with np.errstate(over="ignore"):
        ppl = np.exp(mean)
    return {**doc, "loss": mean, "loss_std": std, "nll": mean, "nll_std": std, "perplexity": ppl}


def resolve_index(sur: Surrogate, kind: str, sizes: str | None = None) -> Index:
    """The :class:`Index` for ``kind`` (auto | shapley | banzhaf | semivalue) and ``sizes`` ``A:B``, chosen the
    way ``layershap shapley --index KIND --sizes A:B`` chooses it (auto = the range the training data cover).
    """
    if kind not in INDEX_KINDS:
        raise LayershapError(f"unknown index kind {kind!r}; use one of {', '.join(INDEX_KINDS)}")
    if sizes is not None and kind not in ("auto", "semivalue"):
        raise LayershapError(f"sizes select the pruning-range semivalue; index kind {kind!r} takes none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the coverage warning is reported by scores_document
        return choose_index(kind, sizes, sur.metadata.get("removed_counts"), sur.n_layers, not_validated(sur.metadata))


def resolve_scores_method(sur: Surrogate, index: Index, method: str, budget: int | None, seed: int,
                          limits: Limits) -> tuple[str, int | None, int | None]:
    """Concrete ``(method, budget, seed)`` of a scores query within ``limits`` (budget and seed only for
    Monte Carlo): ``auto`` is exact up to ``limits.max_exact_layers`` layers, Monte Carlo above.
    """
    n = sur.n_layers
    if method == "auto":
        method = "exact" if n <= limits.max_exact_layers else "mc"
    concrete = resolve_method(method, n, index)
    if concrete == "exact":
        if n > limits.max_exact_layers:
            raise LayershapError(f"exact enumeration is limited to {limits.max_exact_layers} layers on this server "
                                 f"(this surrogate has {n}); ask for method \"mc\" with a budget")
        return concrete, None, None
    budget = min(DEFAULT_BUDGET, limits.max_budget) if budget is None else int(budget)
    if not 1 <= budget <= limits.max_budget:
        raise LayershapError(f"budget {budget} is outside 1..{limits.max_budget} (this server's Monte Carlo cap)")
    if seed < 0:
        raise LayershapError(f"seed must be >= 0; got {seed}")
    return concrete, budget, int(seed)


def _coverage(index: Index, sur: Surrogate) -> tuple[dict, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        coverage = coverage_report(index, sur.metadata.get("removed_counts"), sur.n_layers,
                                   not_validated(sur.metadata))
    return coverage, [str(w.message) for w in caught]


def scores_document(sur: Surrogate, index: Index, method: str, budget: int | None, seed: int | None,
                    source: str) -> dict:
    """The scores JSON of ``layershap shapley`` (ensemble standard errors, ranking, coverage, warnings) for a
    concrete method from :func:`resolve_scores_method`, without timings.
    """
    coverage, notes = _coverage(index, sur)
    kwargs = {"budget": budget, "seed": seed} if budget is not None else {}
    scores = ensemble_scores(sur, index, method, progress=False, **kwargs)
    doc = scores_record(scores, sur.metadata, source=source, index_description=index.describe(sur.n_layers),
                        coverage=coverage, warnings=notes).to_dict()
    for key in TIMING_KEYS:
        doc.pop(key, None)
    return doc


def interactions_document(sur: Surrogate, limits: Limits) -> dict:
    """Exact pairwise Shapley interaction index of the ensemble mean (``float64[n, n]``, diagonal 0)."""
    n = sur.n_layers
    if n > limits.max_exact_layers:
        raise LayershapError(f"pairwise interactions need exact enumeration, limited to {limits.max_exact_layers} "
                             f"layers on this server (this surrogate has {n})")
    matrix = exact_interactions(sur, n, progress=False)
    missing = uncovered_counts(Index("shapley"), sur.removed_counts, n)
    off = np.abs(matrix)
    i, j = np.unravel_index(int(np.argmax(off)), off.shape)
    notes = ([(f"the Shapley interaction index weights every removed-layer count, and the surrogate never saw "
              f"{missing} layers removed in training")] if missing else [])
    return {"model_id": sur.metadata.get("model_id"), "model_hash": sur.metadata.get("model_hash"), "n_layers": n,
            "interaction_index": "shapley_interaction", "utility": "-nll (nats)", "interactions": matrix,
            "strongest": {"layers": [int(i), int(j)], "value": float(matrix[i, j])}, "warnings": notes}


def removal_k(n: int, k: int | None, depth_fraction: float | None) -> int:
    """Layers to remove: ``k`` itself, or ``max(1, round(depth_fraction * n))`` as ``layershap run`` does."""
    if (k is None) == (depth_fraction is None):
        raise LayershapError("give exactly one of k (layers to remove) or depth_fraction (e.g. 0.2)")
    if depth_fraction is not None:
        if not 0.0 < depth_fraction < 1.0:
            raise LayershapError(f"depth_fraction must lie strictly between 0 and 1; got {depth_fraction}")
        k = max(1, round(depth_fraction * n))
    if not 1 <= k < n:
        raise LayershapError(f"cannot remove {k} of {n} layers; choose 1 <= k <= {n - 1}")
    return int(k)


def removal_sets_document(sur: Surrogate, k: int, top: int, beam_width: int, limits: Limits) -> dict:
    """The ``top`` best sets of ``k`` layers to remove by the surrogate (best first), with predicted nll and
    perplexity, from :func:`best_removal_sets` (exhaustive up to ``limits.max_exhaustive`` sets, else beam).
    """
    n = sur.n_layers
    cands, calls, strategy = best_removal_sets(sur, n, k, top=top, beam_width=beam_width,
                                               max_exhaustive=limits.max_exhaustive, progress=False)
    full = float(sur.predict_nll(np.ones((1, n), bool))[0])
    u = sur.utility
    plans = [{"removed": list(c.removed), "predicted_value": c.predicted, f"predicted_{u}": -c.predicted}
             for c in cands]
    full_model = {f"predicted_{u}": full}
    if u == "nll":
        for p, c in zip(plans, cands):
            p["predicted_perplexity"] = _exp(-c.predicted)
        full_model["predicted_perplexity"] = _exp(full)
    return {"model_id": sur.metadata.get("model_id"), "model_hash": sur.metadata.get("model_hash"), "n_layers": n,
            "k": k, "strategy": strategy, "value_calls": calls, "utility": f"-{u} (nats)",
            "full_model": full_model, "candidates": plans}


def sparsities_document(scores_doc: dict, target: float, lam: float, source: str) -> dict:
    """Per-layer sparsities for a target mean: the ``layershap export`` document of a scores document."""
    if not (math.isfinite(target) and math.isfinite(lam)):
        raise LayershapError("target and lambda must be finite numbers")
    return export_document(ScoresRecord.from_dict(scores_doc), target, lam, source)


def candidates_from_document(doc: dict) -> list[Candidate]:
    """The library's :class:`Candidate` objects (value = -nll) of a removal-sets document, best first."""
    return [Candidate(tuple(int(i) for i in c["removed"]), float(c["predicted_value"])) for c in doc["candidates"]]


def _exp(x: float) -> float:
    return math.exp(x) if x < 700.0 else math.inf
