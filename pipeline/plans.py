"""The plan stage of ``layershap run`` and ``layershap plan``: verified depth-pruning plans for several K on an open
oracle session, written to ``plans.json`` and printed as a table.

Example:
    >>> session = open_session(model="gemma-3-270m", text="builtin", masks="loo", out="runs/g/dataset.zarr")
    >>> doc = run_plans(session, text="builtin", out=Path("runs/g"), ks=[1, 2, 3], budget=60)
    >>> print(format_plans(doc))
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from layershap.core.defaults import CALIBRATION_SEQ_LEN, CALIBRATION_WINDOWS, PLAN_BUDGET
from layershap.core.errors import LayershapError
from layershap.core.jsonio import write_json
from layershap.core.masks import check_removal_count
from layershap.oracle.measure import CachedOracle
from layershap.oracle.session import OracleSession, open_validation
from layershap.pruning.plan import find_plans

PLANS_FILE = "plans.json"
FORMAT = "layershap-plans"
DEPTH_REDUCTIONS = (0.10, 0.20, 0.30)


def default_ks(n_layers: int) -> list[int]:
    """The K of each depth reduction (10, 20, 30 % of the layers) and every K from 1 up to min(5, the 30 % K).

    Example:
        >>> default_ks(18), default_ks(32)
        ([1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6, 10])
    """
    depth = {max(1, round(f * n_layers)) for f in DEPTH_REDUCTIONS}
    ks = set(range(1, min(5, max(depth)) + 1)) | depth
    return sorted(k for k in ks if k < n_layers)


def run_plans(session: OracleSession, *, text: str, out: Path, ks: list[int] | None = None,
              budget: int = PLAN_BUDGET, windows: int = CALIBRATION_WINDOWS, seq_len: int = CALIBRATION_SEQ_LEN,
              seed: int = 0, batch_size: int = 4, cache_mb: int | None = None, top_validate: int = 3,
              progress: bool = True) -> dict:
    """Search, measure and validate plans (:func:`~layershap.pruning.plan.find_plans`) on the session's store;
    validation rows go to ``out/validation.zarr``; writes and returns the ``plans.json`` document.

    ``budget`` counts new calibration passes of this call; rows already stored (a rerun) are free.
    """
    n = session.store.n_layers
    ks = sorted({check_removal_count(int(k), n) for k in (ks or default_ks(n))})
    oracle = CachedOracle(session.evaluator, session.store, label="plan candidates", progress=progress)
    validation = open_validation(session, text=text, out=out / "validation.zarr", windows=windows, seq_len=seq_len,
                                 seed=seed, batch_size=batch_size, cache_mb=cache_mb, progress=progress)
    try:
        result = find_plans(oracle, ks, budget=budget, validation=validation.nll, top_validate=top_validate,
                            seed=seed, progress=progress)
    finally:
        validation.store.close()  # the validation store's write lock
    full = float(oracle.nll(np.ones((1, n), dtype=bool))[0])  # measured with the leave-one-out rows
    doc = {
        "format": FORMAT, "format_version": 1,
        "model_id": session.loaded.model_id, "model_hash": session.loaded.model_hash, "n_layers": n,
        "calibration": {"text_id": session.store.attrs.get("text_id"),
                        "windows_sha256": session.store.attrs.get("windows_sha256")},
        "validation": {"windows_sha256": validation.store.attrs.get("windows_sha256")},
        "full_nll": float(full), "full_perplexity": math.exp(full),
        "choice": f"of the {top_validate} best measured sets per K, the lowest calibration + validation nll",
        "plans": [{"k": k, "removed": list(p.removed), "nll": p.nll, "perplexity": math.exp(p.nll),
                   "validation_nll": p.validation_nll,
                   "validation_perplexity": None if p.validation_nll is None else math.exp(p.validation_nll)}
                  for k, p in sorted(result.plans.items())],
        **{key: value for key, value in result.to_dict().items() if key != "plans"},
    }
    write_json(out / PLANS_FILE, doc)
    return doc


def read_plans(path: str | Path) -> dict:
    """A ``plans.json`` document (from ``layershap run`` or ``layershap plan``), checked.

    Example:
        >>> {p["k"]: p["removed"] for p in read_plans("runs/gemma-3-270m/plans.json")["plans"]}
    """
    path = Path(path)
    if path.is_dir():
        path = path / PLANS_FILE
    if not path.is_file():
        raise LayershapError(f"no plans file at {path}; make one with `layershap run` or `layershap plan`")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LayershapError(f"{path} is not valid JSON ({exc}); make it again with `layershap plan`") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("plans"), list):
        raise LayershapError(f"{path} is not a layershap plans file (no \"format\": \"{FORMAT}\")")
    return doc


def plan_for(doc: dict, k: int) -> list[int]:
    """The verified removal set for ``k`` in a plans document, or a clear error naming what to run."""
    for plan in doc["plans"]:
        if int(plan["k"]) == k:
            return [int(i) for i in plan["removed"]]
    have = ", ".join(str(p["k"]) for p in doc["plans"])
    raise LayershapError(f"the plans file has no plan for K = {k} (it has K = {have}); run `layershap plan "
                         f"--remove {k}` on the same store first, or prune by score with --by-score")


def format_plans(doc: dict, lowest: dict[int, list[int]] | None = None) -> str:
    """The plan table: K, layers to remove, calibration and validation perplexity (and the lowest-score sets).

    Example:
        >>> print(format_plans(read_plans("runs/gemma-3-270m")))
    """
    title = f"verified plans (measured; chosen with validation windows): full model perplexity {doc['full_perplexity']:.4g}"
    lines = [title,
             f"  {'K':>3}  {'remove':<24} {'calib ppl':>10} {'valid ppl':>10}" + ("  lowest scores" if lowest else "")]
    for p in doc["plans"]:
        val = "-" if p["validation_perplexity"] is None else f"{p['validation_perplexity']:.4g}"
        extra = f"  {lowest[p['k']]}" if lowest and p["k"] in lowest else ""
        lines.append(f"  {p['k']:>3}  {p['removed']!s:<24} {p['perplexity']:>10.4g} {val:>10}{extra}")
    lines.append(f"  {doc['passes']} oracle passes on calibration windows, {doc['validation_passes']} on "
                 f"validation windows; search stopped: {doc['stopped']}")
    return "\n".join(lines)
