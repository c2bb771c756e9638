"""Fit quality of a surrogate on held-out masks: R², Spearman ρ, Kendall τ-b and RMSE (nats), overall and
per removed-layer-count stratum. Undefined values (fewer than 2 points, constant data) are ``None``.

Example:
    >>> m = fit_metrics(masks, measured_nll, predicted_nll)
    >>> m["overall"]["spearman"], [s["removed"] for s in m["by_removed"]]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import stats


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
    """A small text table of :func:`fit_metrics` output (overall first, then one row per stratum).

    Example:
        >>> print(format_metrics_table(fit_metrics(masks, y, p)))      # doctest: +SKIP
        held-out      n      R²  Spearman  Kendall τ  RMSE (nats)
    """

    def cell(value: float | None, width: int, digits: int = 3) -> str:
        return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"

    lines = [f"{'held-out':<12}{'n':>6}{'R²':>8}{'Spearman':>10}{'Kendall τ':>11}{'RMSE (nats)':>13}"]
    rows = [("all", metrics["overall"])] + [(f"removed {s['removed']}", s) for s in metrics["by_removed"]]
    for name, m in rows:
        lines.append(
            f"{name:<12}{m['n']:>6}{cell(m['r2'], 8)}{cell(m['spearman'], 10)}{cell(m['kendall'], 11)}"
            f"{cell(m['rmse'], 13, 4)}"
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
        f"surrogate validation on held-out masks (nll in nats; {members} member(s), seed {seed}):",
        format_metrics_table(metrics),
        "",
        f"surrogate written to {out}/ : metadata.json, member_*.pt, validation.npz, history.csv",
        f"predicted vs measured plot: {out / 'fit.png'}",
    ])
