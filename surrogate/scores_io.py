"""The layer-scores JSON file other tools read (DESIGN.md "Output JSON").

Fields: ``format``/``format_version``, ``package_version``, ``model_id``, ``model_hash``, ``n_layers``,
``dataset_hash``, ``method``, ``index`` (``shapley`` | ``semivalue[A:B]`` | ``banzhaf``) and
``index_description``, ``utility`` (``"-nll (nats)"``: scores are in nats of mean token log-likelihood, higher =
more important), ``scores`` and ``stderr`` (per layer), ``ranking`` (layer indices, least important first),
``prune_rank`` (1 = least important), ``n_evals``, ``seconds``, ``efficiency`` (Σ scores vs v(full) − v(empty)),
``coverage`` (removed-layer counts in the surrogate's data, weighted by the index, and uncovered),
``surrogate_metrics`` (validation metrics), and — when computed — ``interactions`` (n × n pairwise Shapley
interaction index, diagonal 0). Unknown extra fields are allowed; readers ignore what they do not use.

Example:
    >>> write_scores("scores.json", scores, surrogate.metadata, source="runs/x/surrogate")
    >>> doc = read_scores("scores.json"); doc["ranking"][:3]      # three least important layers
"""

from __future__ import annotations

import json
import math
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from layershap.oracle.errors import LayershapError

from .game import Scores

FORMAT = "layershap-scores"
FORMAT_VERSION = 1
UTILITY = "-nll (nats)"
REQUIRED_FIELDS = ("format", "format_version", "n_layers", "method", "index", "utility", "scores", "stderr",
                   "ranking")


def jsonable(obj: Any) -> Any:
    """Convert numpy arrays/scalars, paths and tuples to plain JSON types (non-finite floats become None)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dumps_compact(obj: Any, indent: int = 0) -> str:
    """JSON with 2-space indentation, but lists of numbers/strings on one line (matrices: one row a line)."""
    pad, inner = "  " * indent, "  " * (indent + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(k)}: {dumps_compact(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if all(not isinstance(v, (dict, list)) for v in obj):
            return json.dumps(obj, allow_nan=False)
        return "[\n" + ",\n".join(inner + dumps_compact(v, indent + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj, allow_nan=False)


def _package_version() -> str:
    try:
        return version("layershap")
    except PackageNotFoundError:
        return "unknown"


def scores_to_dict(
    scores: Scores,
    metadata: dict | None = None,
    *,
    source: str | Path | None = None,
    index_description: str | None = None,
    coverage: dict | None = None,
    extra_fields: dict | None = None,
) -> dict:
    """The JSON document for ``scores`` of the model described by ``metadata`` (surrogate metadata dict)."""
    meta = metadata or {}
    if meta.get("n_layers") is not None and int(meta["n_layers"]) != scores.n_layers:
        raise LayershapError(
            f"scores cover {scores.n_layers} layers but the metadata describe a {meta['n_layers']}-layer model"
        )
    doc: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": _package_version(),
        "model_id": meta.get("model_id"),
        "model_hash": meta.get("model_hash"),
        "n_layers": scores.n_layers,
        "dataset_hash": meta.get("dataset_hash"),
        "source": str(source) if source is not None else None,
        "method": scores.method,
        "index": scores.index,
        "index_description": index_description,
        "utility": UTILITY,
        "scores": scores.values,
        "stderr": scores.stderr,
        "ranking": scores.ranking(),
        "ranking_order": "least important first",
        "prune_rank": scores.prune_rank(),
        "n_evals": scores.n_evals,
        "seconds": scores.extra.get("seconds"),
        "seed": scores.extra.get("seed"),
        "budget": scores.extra.get("budget"),
        "efficiency": scores.extra.get("efficiency"),
        "coverage": coverage,
        "surrogate_metrics": meta.get("metrics"),
    }
    if "interactions" in scores.extra:
        doc["interactions"] = scores.extra["interactions"]
        doc["interaction_index"] = scores.extra.get("interaction_index", "shapley_interaction")
    for key in ("n_permutation_pairs", "samples_per_size", "exhaustive_sizes", "members", "estimator_stderr",
                "surrogate_stderr", "stderr_kind"):
        if key in scores.extra:
            doc[key] = scores.extra[key]
    if extra_fields:
        doc.update(extra_fields)
    return jsonable(doc)


def write_scores(path: str | Path, scores: Scores, metadata: dict | None = None, **kwargs: Any) -> dict:
    """Write the scores JSON (keyword arguments as :func:`scores_to_dict`); returns the document written.

    Example:
        >>> write_scores("out/scores.json", scores, surrogate.metadata, source="out/surrogate")
    """
    doc = scores_to_dict(scores, metadata, **kwargs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps_compact(doc) + "\n")
    tmp.replace(path)  # never leave a half-written file behind
    return doc


def read_scores(path: str | Path) -> dict:
    """Read and check a scores JSON; a missing file or another kind of JSON is a :class:`LayershapError`.

    Example:
        >>> doc = read_scores("scores.json"); np.asarray(doc["scores"])
    """
    path = Path(path)
    if not path.is_file():
        raise LayershapError(f"no scores file at {path}; create one with `layershap shapley SURROGATE_DIR --out {path}`")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
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
    return doc


def scores_from_dict(doc: dict) -> Scores:
    """Rebuild a :class:`Scores` from a document of :func:`read_scores` (interactions kept in ``extra``)."""
    extra: dict[str, Any] = {k: doc[k] for k in ("efficiency", "seconds", "seed", "budget") if doc.get(k) is not None}
    if doc.get("interactions") is not None:
        extra["interactions"] = np.asarray(doc["interactions"], dtype=np.float64)
    return Scores(
        values=np.asarray(doc["scores"], dtype=np.float64),
        stderr=np.asarray([0.0 if s is None else s for s in doc["stderr"]], dtype=np.float64),
        method=doc["method"],
        index=doc["index"],
        n_evals=int(doc.get("n_evals") or 0),
        extra=extra,
    )
