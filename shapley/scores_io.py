"""The layer-scores JSON file other tools read, and its typed form in memory (:class:`ScoresRecord`).

Fields: ``format``/``format_version``, ``package_version``, ``model_id``, ``model_hash``, ``n_layers``,
``dataset_hash``, ``method``, ``index`` (``shapley`` | ``semivalue[A:B]`` | ``banzhaf``) and
``index_description``, ``utility`` (``"-nll (nats)"``: scores are in nats of mean token log-likelihood, higher =
more important), ``scores`` and ``stderr`` (per layer), ``ranking`` (layer indices, least important first),
``prune_rank`` (1 = least important), ``n_evals``, ``seconds``, ``efficiency`` (Σ scores vs v(full) − v(empty)),
``coverage`` (removed-layer counts in the surrogate's data, weighted by the index, uncovered and not validated),
``surrogate_metrics`` (validation metrics), ``warnings``, and — when computed — ``interactions`` (n × n
pairwise Shapley interaction index, diagonal 0). Unknown extra fields are allowed; readers ignore them.

Example:
    >>> record = write_scores("scores.json", scores, surrogate.metadata, source="runs/x/surrogate")  # doctest: +SKIP
    >>> back = read_scores("scores.json"); back.scores.ranking()[:3]      # three least important layers  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from layershap.core.errors import LayershapError
from layershap.core.jsonio import dumps_compact, jsonable, package_version, write_text_atomic

from .game import Scores

FORMAT = "layershap-scores"
FORMAT_VERSION = 1
UTILITY = "-nll (nats)"
REQUIRED_FIELDS = ("format", "format_version", "n_layers", "method", "index", "utility", "scores", "stderr",
                   "ranking")
# Scores.extra entries written as top-level fields and read back into Scores.extra.
EXTRA_FIELDS = ("efficiency", "seconds", "seed", "budget", "n_permutation_pairs", "samples_per_size",
                "exhaustive_sizes", "members", "estimator_stderr", "surrogate_stderr", "stderr_kind",
                "interaction_index")


@dataclass
class ScoresRecord:
    """A scores file in memory: the :class:`Scores` and the model, data and choices they belong to."""

    scores: Scores
    model_id: str | None = None
    model_hash: str | None = None
    dataset_hash: str | None = None
    source: str | None = None
    index_description: str | None = None
    coverage: dict | None = None
    surrogate_metrics: dict | None = None
    warnings: list[str] = field(default_factory=list)
    package_version: str | None = None

    @property
    def n_layers(self) -> int:
        return self.scores.n_layers

    @property
    def identity(self) -> dict:
        """``model_id``, ``model_hash`` and ``n_layers``, as the identity check compares them."""
        return {"model_id": self.model_id, "model_hash": self.model_hash, "n_layers": self.n_layers}

    def to_dict(self) -> dict:
        """The JSON document (plain JSON types)."""
        s = self.scores
        doc: dict[str, Any] = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "package_version": self.package_version or package_version(),
            "model_id": self.model_id, "model_hash": self.model_hash, "n_layers": s.n_layers,
            "dataset_hash": self.dataset_hash, "source": self.source, "method": s.method, "index": s.index,
            "index_description": self.index_description, "utility": UTILITY,
            "scores": s.values, "stderr": s.stderr, "ranking": s.ranking(), "ranking_order": "least important first",
            "prune_rank": s.prune_rank(), "n_evals": s.n_evals,
            "seconds": s.extra.get("seconds"), "seed": s.extra.get("seed"), "budget": s.extra.get("budget"),
            "efficiency": s.extra.get("efficiency"), "coverage": self.coverage,
            "surrogate_metrics": self.surrogate_metrics,
        }
        if "interactions" in s.extra:
            doc["interactions"] = s.extra["interactions"]
            doc["interaction_index"] = s.extra.get("interaction_index", "shapley_interaction")
        for key in EXTRA_FIELDS:
            if key in s.extra and key not in doc:
                doc[key] = s.extra[key]
        doc["warnings"] = list(self.warnings)
        return jsonable(doc)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ScoresRecord:
        """The record of a checked document (see :func:`read_scores`)."""
        extra: dict[str, Any] = {k: doc[k] for k in EXTRA_FIELDS if doc.get(k) is not None}
        if doc.get("interactions") is not None:
            extra["interactions"] = np.asarray(doc["interactions"], dtype=np.float64)
        scores = Scores(
            values=np.asarray(doc["scores"], dtype=np.float64),
            stderr=np.asarray([0.0 if s is None else s for s in doc["stderr"]], dtype=np.float64),
            method=doc["method"], index=doc["index"], n_evals=int(doc.get("n_evals") or 0), extra=extra,
        )
        return cls(scores, model_id=doc.get("model_id"), model_hash=doc.get("model_hash"),
                   dataset_hash=doc.get("dataset_hash"), source=doc.get("source"),
                   index_description=doc.get("index_description"), coverage=doc.get("coverage"),
                   surrogate_metrics=doc.get("surrogate_metrics"), warnings=list(doc.get("warnings") or []),
                   package_version=doc.get("package_version"))


def scores_record(
    scores: Scores,
    metadata: Mapping[str, Any] | None = None,
    *,
    source: str | Path | None = None,
    index_description: str | None = None,
    coverage: dict | None = None,
    warnings: list[str] | None = None,
) -> ScoresRecord:
    """The record for ``scores`` of the model a surrogate's ``metadata`` describe (model id/hash, dataset hash,
    metrics); a layer-count mismatch is a :class:`LayershapError`.

    Example:
        >>> scores_record(scores, surrogate.metadata, source="runs/x/surrogate").identity  # doctest: +SKIP
    """
    meta = metadata or {}
    if meta.get("n_layers") is not None and int(meta["n_layers"]) != scores.n_layers:
        raise LayershapError(
            f"scores cover {scores.n_layers} layers but the metadata describe a {meta['n_layers']}-layer model"
        )
    return ScoresRecord(scores, model_id=meta.get("model_id"), model_hash=meta.get("model_hash"),
                        dataset_hash=meta.get("dataset_hash"), source=None if source is None else str(source),
                        index_description=index_description, coverage=coverage,
                        surrogate_metrics=meta.get("metrics"), warnings=list(warnings or []))


def write_scores(path: str | Path, scores: Scores, metadata: Mapping[str, Any] | None = None,
                 **kwargs: Any) -> ScoresRecord:
    """Write the scores JSON atomically (keyword arguments as :func:`scores_record`); returns the record written.

    Example:
        >>> write_scores("out/scores.json", scores, surrogate.metadata, source="out/surrogate")  # doctest: +SKIP
    """
    record = scores_record(scores, metadata, **kwargs)
    write_text_atomic(path, dumps_compact(record.to_dict()) + "\n")
    return record


def read_scores(path: str | Path) -> ScoresRecord:
    """Read and check a scores JSON; a missing file or another kind of JSON is a :class:`LayershapError`.

    Example:
        >>> record = read_scores("scores.json"); record.scores.values, record.model_id  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise LayershapError(f"no scores file at {path}; create one with `layershap shapley SURROGATE_DIR --out {path}`")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LayershapError(f"{path} is not valid JSON ({exc}); regenerate it with `layershap shapley`") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise LayershapError(f"{path} is not a layershap scores file (no \"format\": \"{FORMAT}\")")
    missing = [k for k in REQUIRED_FIELDS if k not in doc]
    if missing:
        raise LayershapError(f"{path} lacks fields {missing}; regenerate it with `layershap shapley`")
    if int(doc["format_version"]) > FORMAT_VERSION:
        raise LayershapError(
            f"{path} has scores format version {doc['format_version']}, newer than this layershap reads "
            f"({FORMAT_VERSION}); upgrade layershap"
        )
    n = int(doc["n_layers"])
    if len(doc["scores"]) != n or len(doc["stderr"]) != n or sorted(doc["ranking"]) != list(range(n)):
        raise LayershapError(f"{path} is inconsistent: scores, stderr and ranking must cover all {n} layers")
    if any(v is None for v in doc["scores"]):
        raise LayershapError(f"{path} has missing (non-finite) scores; recompute them with `layershap shapley`")
    return ScoresRecord.from_dict(doc)
