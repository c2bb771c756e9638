"""Exact semivalues and pairwise Shapley interactions by streaming enumeration of all 2^n layer masks.

One pass over the integers ``0 .. 2^n − 1`` in batches: each batch's masks are built from the integers with bit
operations (bit ``j`` = layer ``j`` kept), evaluated, and folded into float64 accumulators, so at most one batch
of masks exists at a time. A mask ``T`` with ``t = |T|`` kept layers and value ``v(T)`` adds ``+p_(t−1)·v(T)``
to every layer in ``T`` and ``−p_t·v(T)`` to every layer outside it, which sums to

    phi_i = Σ_{S ⊆ N∖i} p_|S| [v(S ∪ i) − v(S)].

Values are centred on ``v(empty)`` first (semivalues and interactions ignore a constant), which keeps the
float64 sums precise. For the Shapley value, efficiency ``Σ phi = v(full) − v(empty)`` is checked; since it
is an identity of the Shapley weights, the check guards the arithmetic (weights, accumulation, precision).

Example:
    >>> scores = exact_semivalue(surrogate, 18)                       # Shapley value, 262 144 masks  # doctest: +SKIP
    >>> scores = exact_semivalue(surrogate, 18, Index("semivalue", 1, 6), interactions=True)  # doctest: +SKIP
"""

from __future__ import annotations

import time

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from layershap.core.errors import LayershapError
from layershap.core.masks import masks_from_ints

from .game import Scores, ValueFunction, evaluate
from .semivalues import Index, shapley_interaction_weights

MAX_EXACT_LAYERS = 24
DEFAULT_BATCH = 1 << 16
EFFICIENCY_RTOL = 1e-6


class EfficiencyError(ArithmeticError):
    """Exact Shapley values violate efficiency (Σ phi ≠ v(full) − v(empty)): a numerical failure."""


def check_exact_size(n: int, max_layers: int = MAX_EXACT_LAYERS) -> None:
    """Raise :class:`LayershapError` if ``2^n`` masks are too many to enumerate."""
    if n > max_layers:
        raise LayershapError(
            f"exact enumeration needs 2^{n} = {2**n:,} value evaluations, more than this package enumerates "
            f"(n <= {max_layers}); use Monte Carlo instead (--method mc --mc-evals N)"
        )
    if n < 1:
        raise LayershapError(f"need at least one layer; got n = {n}")


def efficiency_report(
    values: np.ndarray, v_full: float, v_empty: float, applies: bool, sum_stderr: float = 0.0
) -> dict:
    """Compare ``Σ values`` with ``v(full) − v(empty)``; ``ok`` is judged only where efficiency ``applies``.

    Exact values must agree to a relative 1e-6; Monte Carlo sums (standard error ``sum_stderr``) within
    4 standard errors.
    """
    total = float(np.sum(values))
    target = float(v_full - v_empty)
    abs_err = abs(total - target)
    scale = max(abs(target), float(np.sum(np.abs(values))))
    rel_err = abs_err / scale if scale > 0 else abs_err
    ok = rel_err <= EFFICIENCY_RTOL or abs_err <= 4.0 * sum_stderr
    return {
        "applies": bool(applies),
        "sum_scores": total,
        "v_full": float(v_full),
        "v_empty": float(v_empty),
        "v_full_minus_v_empty": target,
        "abs_error": abs_err,
        "rel_error": rel_err,
        "sum_stderr": float(sum_stderr),
        "ok": bool(ok) if applies else None,
    }


def exact_semivalue(
    v: ValueFunction,
    n: int,
    index: Index | None = None,
    *,
    interactions: bool = False,
    batch_size: int = DEFAULT_BATCH,
    progress: bool | None = None,
    check_efficiency: bool = True,
) -> Scores:
    """Exact semivalue of every layer (default: Shapley) from all ``2^n`` masks, streamed in batches.

    With ``interactions=True`` the same pass also yields the pairwise Shapley interaction index
    ``I_ij = Σ_{S ⊆ N∖{i,j}} |S|!(n−|S|−2)!/(n−1)! [v(S∪{i,j}) − v(S∪i) − v(S∪j) + v(S)]`` in
    ``extra["interactions"]`` (float64[n, n], diagonal 0). For a Shapley index, a violated efficiency
    (relative error > 1e-6) raises :class:`EfficiencyError`; the check is always recorded in ``extra``.
    ``batch_size`` is rounded down to a power of two (masks per value-function call).

    Example:
        >>> s = exact_semivalue(lambda m: m.sum(1).astype(float), 4)
        >>> s.values
        array([1., 1., 1., 1.])
    """
    index = Index("shapley") if index is None else index
    check_exact_size(n)
    index.validate(n)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if interactions and n < 2:
        raise LayershapError("pairwise interactions need at least 2 layers")
    start_time = time.perf_counter()
    p = index.weights(n)
    # coefficient tables indexed by t = |T| (0..n): p_plus[t] = p_(t-1), p_minus[t] = p_t
    p_plus = np.concatenate([[0.0], p])
    p_minus = np.concatenate([p, [0.0]])
    coef_in = p_plus + p_minus  # mask T adds v·coef_in[t] to i ∈ T and v·(−p_minus[t]) to all i
    if interactions:
        w = shapley_interaction_weights(n)
        w_a = np.concatenate([[0.0, 0.0], w])  # w_(t-2): i, j both in T
        w_b = np.concatenate([[0.0], w, [0.0]])  # w_(t-1): exactly one of i, j in T
        w_c = np.concatenate([w, [0.0, 0.0]])  # w_t: neither in T
        gram = np.zeros((n, n), dtype=np.float64)
        cross = np.zeros(n, dtype=np.float64)
        c_total = 0.0

    total = 1 << n
    low_bits = min(n, int(batch_size).bit_length() - 1)  # batch = 2^low_bits masks
    batch = 1 << low_bits
    # mask of code h·batch + l: layers 0..low_bits-1 from l (a fixed table), the rest from h (constant per batch)
    low = masks_from_ints(np.arange(batch), low_bits)
    low_f = low.astype(np.float64)
    low_ft = np.ascontiguousarray(low_f.T)
    low_t = low.sum(axis=1)
    acc = np.zeros(n, dtype=np.float64)
    minus_total = 0.0
    v_empty = v_full = None
    show = total > (1 << 16) if progress is None else progress
    bar = tqdm(total=total, desc=f"exact {index.name} (2^{n} masks)", unit="mask", disable=not show,
               unit_scale=True, leave=False)
    limit = threadpool_limits(limits=1, user_api="blas")  # small products: a threaded BLAS only loses here
    try:
        for h in range(total // batch):
            high = masks_from_ints(np.array([h]), n - low_bits)[0]
            high_f = high.astype(np.float64)
            masks = np.empty((batch, n), dtype=bool)
            masks[:, :low_bits] = low
            masks[:, low_bits:] = high
            raw = evaluate(v, masks)
            if h == 0:
                v_empty = float(raw[0])
            if (h + 1) * batch == total:
                v_full = float(raw[-1])
            vals = raw - v_empty
            t = low_t + int(high.sum())
            cv = vals * coef_in[t]
            acc[:low_bits] += low_ft @ cv
            acc[low_bits:] += high_f * cv.sum()
            minus_total += float((vals * p_minus[t]).sum())
            if interactions:
                a, b, c = vals * w_a[t], vals * w_b[t], vals * w_c[t]
                d, e = a + 2.0 * b + c, b + c
                g_low = low_ft @ d
                gram[:low_bits, :low_bits] += (low_ft * d) @ low_f
                gram[:low_bits, low_bits:] += np.outer(g_low, high_f)
                gram[low_bits:, :low_bits] += np.outer(high_f, g_low)
                gram[low_bits:, low_bits:] += d.sum() * np.outer(high_f, high_f)
                cross[:low_bits] += low_ft @ e
                cross[low_bits:] += high_f * e.sum()
                c_total += float(c.sum())
            bar.update(batch)
    finally:
        limit.restore_original_limits()
        bar.close()
    values = acc - minus_total
    extra: dict = {}
    is_shapley = index.is_shapley(n)
    extra["efficiency"] = efficiency_report(values, v_full, v_empty, applies=is_shapley)
    if interactions:
        inter = gram - cross[:, None] - cross[None, :] + c_total
        np.fill_diagonal(inter, 0.0)
        extra["interactions"] = inter
        extra["interaction_index"] = "shapley_interaction"
    extra["seconds"] = time.perf_counter() - start_time
    if check_efficiency and is_shapley and not extra["efficiency"]["ok"]:
        eff = extra["efficiency"]
        raise EfficiencyError(
            f"exact Shapley values break efficiency: sum = {eff['sum_scores']:.12g} but v(full) - v(empty) = "
            f"{eff['v_full_minus_v_empty']:.12g} (relative error {eff['rel_error']:.3g} > {EFFICIENCY_RTOL}); "
            "the value function may be non-deterministic or overflow"
        )
    return Scores(
        values=values,
        stderr=np.zeros(n, dtype=np.float64),
        method="exact",
        index=index.name,
        n_evals=total,
        extra=extra,
    )


def exact_interactions(
    v: ValueFunction, n: int, *, batch_size: int = DEFAULT_BATCH, progress: bool | None = None
) -> np.ndarray:
    """Pairwise Shapley interaction index ``float64[n, n]`` (diagonal 0) by exact enumeration.

    Example:
        >>> float(exact_interactions(lambda m: (m[:, 0] & m[:, 1]).astype(float), 3)[0, 1])
        1.0
    """
    scores = exact_semivalue(v, n, Index("shapley"), interactions=True, batch_size=batch_size, progress=progress)
    return scores.extra["interactions"]
