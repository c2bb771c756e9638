"""Fit quality of a surrogate on held-out masks: R², Spearman ρ, Kendall τ-b and RMSE (nats), overall and
per removed-layer-count stratum (undefined values — fewer than 2 points, constant data — are ``None``), and
which removed-layer counts those metrics *validate* (:func:`not_validated`, the one statement of the rule).

Example:
    >>> m = fit_metrics(masks, measured_nll, predicted_nll)  # doctest: +SKIP
    >>> m["overall"]["spearman"], [s["removed"] for s in m["by_removed"]]  # doctest: +SKIP
    >>> not_validated(surrogate.metadata)       # {8: "Spearman 0.20 < 0.5 on 9 held-out rows", ...}  # doctest: +SKIP
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import stats

# How `train_ensemble` held rows out; metadata without it (older surrogates) scored each member on the fold it
# also early-stopped on, which flatters the metrics.
SPLIT_PROTOCOL = "nested"
# A removed-layer count is validated when its held-out rows show that the surrogate orders its masks: at least
# VALIDATION_MIN_ROWS rows (below 5 no rank test reaches 5 %), Spearman >= VALIDATION_MIN_SPEARMAN and above
# chance (one-sided p < VALIDATION_MAX_P: the bar rises to 0.64 on 8 rows, 0.60 on 9). A rank correlation, not
# R²: R² in nats is decided by a count's one or two catastrophic masks (Gemma-3-270M, 4 removed: one mask
# predicted 54.5 instead of 14.6 nats gives R² -1.07 at Spearman 0.82), and it reads the same in log-nll.
VALIDATION_MIN_ROWS = 5
VALIDATION_MIN_SPEARMAN = 0.5
VALIDATION_MAX_P = 0.05
VALIDATION_RULE = (f"held-out rows >= {VALIDATION_MIN_ROWS}, Spearman >= {VALIDATION_MIN_SPEARMAN:g} and "
                   f"one-sided p < {VALIDATION_MAX_P:g}; 0 removed: exact by the anchor at the measured full model")


def regression_metrics(measured: np.ndarray, predicted: np.ndarray) -> dict:
    """``{"n", "r2", "spearman", "kendall", "rmse"}`` of predictions against measurements.

    R² = 1 - SS_res / SS_tot (can be negative); Spearman and Kendall (τ-b, ties handled) come from scipy.

    Example:
        >>> regression_metrics(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0]))["spearman"]
        1.0
    """
    y = np.asarray(measured, dtype=np.float64).reshape(-1)
    p = np.asarray(predicted, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"{len(y)} measured values but {len(p)} predictions")
    n = len(y)
    out: dict = {"n": n, "r2": None, "spearman": None, "kendall": None, "rmse": None}
    if n == 0:
        return out
    out["rmse"] = float(np.sqrt(np.mean((y - p) ** 2)))
    if n < 2:
        return out
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot > 0:
        out["r2"] = 1.0 - float(np.sum((y - p) ** 2)) / ss_tot
    if np.ptp(y) > 0 and np.ptp(p) > 0:
        out["spearman"] = float(stats.spearmanr(y, p).statistic)
        out["kendall"] = float(stats.kendalltau(y, p).statistic)
    return out


def fit_metrics(masks: np.ndarray, measured: np.ndarray, predicted: np.ndarray) -> dict:
    """``{"overall": {...}, "by_removed": [{"removed": r, ...}, ...]}`` (strata sorted by r).

    Example:
        >>> masks = np.array([[1, 0], [0, 1], [1, 1]], bool)
        >>> fit_metrics(masks, np.array([1.0, 2.0, 0.5]), np.array([1.1, 1.9, 0.4]))["by_removed"][1]["n"]
        2
    """
    masks = np.asarray(masks, dtype=bool)
    removed = (~masks).sum(axis=1)
    measured = np.asarray(measured, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    by = []
    for r in np.unique(removed):
        sel = removed == r
        by.append({"removed": int(r), **regression_metrics(measured[sel], predicted[sel])})
    return {"overall": regression_metrics(measured, predicted), "by_removed": by}


def format_metrics_table(metrics: dict) -> str:
    """A small text table of :func:`fit_metrics` output (overall first, then one row per stratum, each with
    whether its held-out rows validate the count, :func:`stratum_verdict`).

    Example:
        >>> print(format_metrics_table(fit_metrics(masks, y, p)))      # doctest: +SKIP
        held-out      n      R²  Spearman  Kendall τ  RMSE (nats)  validated
    """

    def cell(value: float | None, width: int, digits: int = 3) -> str:
        return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"

    lines = [f"{'held-out':<12}{'n':>6}{'R²':>8}{'Spearman':>10}{'Kendall τ':>11}{'RMSE (nats)':>13}  validated"]
    rows = [("all", metrics["overall"])] + [(f"removed {s['removed']}", s) for s in metrics["by_removed"]]
    for name, m in rows:
        verdict = "" if name == "all" else "  " + ("yes" if (why := stratum_verdict(m)) is None else f"no: {why}")
        lines.append(
            f"{name:<12}{m['n']:>6}{cell(m['r2'], 8)}{cell(m['spearman'], 10)}{cell(m['kendall'], 11)}"
            f"{cell(m['rmse'], 13, 4)}{verdict}"
        )
    return "\n".join(lines)


def training_report(metrics: dict, members: int, seed: int, out_dir: str | Path) -> str:
    """What ``layershap train`` (and ``layershap run``) print after training: the metrics table and the files.

    Example:
        >>> print(training_report(surrogate.metadata["metrics"], 8, 0, "runs/x/surrogate"))   # doctest: +SKIP
    """
    out = Path(out_dir)
    return "\n".join([
        "",
        (f"surrogate validation on held-out masks (nll in nats; {members} member(s), seed {seed}; each row "
         f"predicted by a network that neither fitted nor early-stopped on it; validated = {VALIDATION_RULE}):"),
        format_metrics_table(metrics),
        "",
        f"surrogate written to {out}/ : metadata.json, member_*.pt, validation.npz, history.csv",
        f"predicted vs measured plot: {out / 'fit.png'}",
    ])


def spearman_p(rho: float, n: int) -> float:
    """One-sided p-value of a Spearman correlation ``rho`` on ``n`` points (the t approximation scipy uses).

    Example:
        >>> round(spearman_p(0.6, 9), 3)
        0.044
    """
    if n < 3:
        return 1.0
    if rho >= 1.0:
        return 0.0
    t = rho * math.sqrt((n - 2) / (1.0 - rho * rho))
    return float(stats.t.sf(t, n - 2))


def stratum_verdict(stratum: dict) -> str | None:
    """Why one ``by_removed`` entry of :func:`fit_metrics` does not validate its count, or ``None`` if it does.

    Example:
        >>> stratum_verdict({"removed": 8, "n": 9, "r2": -6.1, "spearman": 0.38})
        'Spearman 0.38 < 0.5 on 9 held-out rows'
        >>> stratum_verdict({"removed": 9, "n": 9, "r2": -3.0, "spearman": 0.55})
        'Spearman 0.55 on 9 held-out rows is not above chance (one-sided p 0.06 >= 0.05)'
    """
    n, rho = int(stratum.get("n") or 0), stratum.get("spearman")
    if n < VALIDATION_MIN_ROWS:
        return f"{n} held-out row{'s' * (n != 1)} < {VALIDATION_MIN_ROWS}"
    if rho is None:
        return f"Spearman undefined on {n} held-out rows (constant measurements or predictions)"
    if rho < VALIDATION_MIN_SPEARMAN:
        return f"Spearman {rho:.2f} < {VALIDATION_MIN_SPEARMAN:g} on {n} held-out rows"
    p = spearman_p(rho, n)
    if p >= VALIDATION_MAX_P:
        return (f"Spearman {rho:.2f} on {n} held-out rows is not above chance (one-sided p {p:.2f} >= "
                f"{VALIDATION_MAX_P:g})")
    return None


def not_validated(metadata: dict) -> dict[int, str] | None:
    """The removed-layer counts of a surrogate's training data that its held-out metrics do not validate,
    each with the reason (:data:`VALIDATION_RULE`); ``None`` when the metadata hold no per-count metrics
    (coverage is then known only by which counts the data contain).

    Count 0 (the full model) is exact by construction when the members are anchored at it. Metadata written
    before nested cross-validation (no ``split.protocol``) are judged on their optimistic out-of-fold metrics
    and every reason says so.

    Example:
        >>> not_validated(load_surrogate("artifacts/gemma-3-270m/surrogate").metadata)[8]   # doctest: +SKIP
        'Spearman 0.38 < 0.5 on 9 held-out rows (out-of-fold metrics on the early-stopping folds; retrain)'
    """
    by = (metadata.get("metrics") or {}).get("by_removed")
    counts = metadata.get("removed_counts")
    if by is None or counts is None:
        return None
    strata = {int(s["removed"]): s for s in by}
    anchored = (metadata.get("architecture") or {}).get("anchor") is not None
    old = (metadata.get("split") or {}).get("protocol") != SPLIT_PROTOCOL
    out = {}
    for r in sorted(int(c) for c in counts):
        if r == 0 and anchored:
            continue
        why = stratum_verdict(strata[r]) if r in strata else "no held-out row"
        if why is not None:
            out[r] = why + (" (out-of-fold metrics on the early-stopping folds; retrain)" if old else "")
    return out
