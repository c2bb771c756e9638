"""Monte Carlo layer scores with standard errors, for games too large to enumerate.

* :func:`permutation_shapley` — paired (antithetic) permutation sampling of the Shapley value: each random
  order of the layers is walked together with its reverse; a layer's marginal contributions in the two are
  averaged, and the pair averages are i.i.d., which gives the standard error. Every permutation's
  contributions sum to ``v(full) − v(empty)``, so efficiency holds exactly.
* :func:`stratified_semivalue` — size-stratified sampling for any semivalue: for each layer ``i`` and
  coalition size ``s`` with weight, sample ``S`` uniformly among the size-``s`` subsets of the other layers,
  estimate the stratum's mean marginal contribution and its variance, and combine
  ``phi_i = Σ_s q_s·mean_(i,s)`` with ``q_s = p_s·C(n−1, s)``; ``Var = Σ_s q_s²·var_(i,s)/m_(i,s)``.
  Samples go to strata in proportion to ``q_s`` (at least 2 each); a stratum no larger than its share is
  enumerated exactly (no variance).

``budget`` counts value-function evaluations, including ``v(full)`` and ``v(empty)``. Same seed, same
arguments -> same output.

Example:
    >>> s = permutation_shapley(surrogate, 32, budget=200_000, seed=0)  # doctest: +SKIP
    >>> s.values, s.stderr  # doctest: +SKIP
    >>> s = stratified_semivalue(surrogate, 32, 200_000, Index("semivalue", 1, 8), seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
from tqdm.auto import tqdm

from layershap.core.errors import LayershapError

from .exact import DEFAULT_BATCH, efficiency_report, exact_semivalue
from .game import Scores, ValueFunction, evaluate
from .semivalues import Index


def _ends(v: ValueFunction, n: int) -> tuple[float, float]:
    """``(v(full), v(empty))``."""
    vals = evaluate(v, np.stack([np.ones(n, bool), np.zeros(n, bool)]))
    return float(vals[0]), float(vals[1])


def _check_budget(budget: int) -> None:
    if not isinstance(budget, (int, np.integer)) or budget < 1:
        raise LayershapError(f"the Monte Carlo budget (--mc-evals) must be a positive number of evaluations; got {budget!r}")


def permutation_shapley(
    v: ValueFunction,
    n: int,
    budget: int,
    *,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH,
    progress: bool | None = None,
) -> Scores:
    """Shapley values by paired (antithetic) permutation sampling with ``budget`` evaluations.

    A permutation pair costs ``2(n−1)`` evaluations; at least 2 pairs are needed for a standard error.

    Example:
        >>> s = permutation_shapley(lambda m: m.sum(1).astype(float), 40, budget=10_000)
        >>> bool((s.values.round(6) == 1.0).all()), float(s.stderr.max())      # all 1.0, stderr 0
        (True, 0.0)
    """
    _check_budget(budget)
    if n < 2:
        return exact_semivalue(v, n, Index("shapley"), progress=False)
    start_time = time.perf_counter()
    per_pair = 2 * (n - 1)
    n_pairs = (budget - 2) // per_pair
    if n_pairs < 2:
        raise LayershapError(
            f"budget {budget} is too small for paired permutation sampling on {n} layers: one pair of "
            f"permutations costs {per_pair} evaluations and a standard error needs 2 pairs; "
            f"use --mc-evals {2 + 2 * per_pair} or more"
        )
    rng = np.random.default_rng(seed)
    v_full, v_empty = _ends(v, n)
    pairs_per_chunk = max(1, batch_size // per_pair)
    pair_means: list[np.ndarray] = []
    show = n_pairs * per_pair > (1 << 16) if progress is None else progress
    bar = tqdm(total=n_pairs * per_pair, desc=f"permutation Shapley ({n} layers)", unit="eval",
               unit_scale=True, disable=not show, leave=False)
    try:
        done = 0
        while done < n_pairs:
            m = min(pairs_per_chunk, n_pairs - done)
            perms = rng.permuted(np.tile(np.arange(n), (m, 1)), axis=1)
            orders = np.concatenate([perms, perms[:, ::-1]])  # rows m.. are the reversed (antithetic) orders
            rank = np.argsort(orders, axis=1)  # position of each layer in its order
            k = np.arange(1, n)
            prefix = rank[:, None, :] < k[None, :, None]  # (2m, n-1, n): first k layers of the order kept
            vals = evaluate(v, prefix.reshape(-1, n)).reshape(2 * m, n - 1)
            table = np.empty((2 * m, n + 1), dtype=np.float64)
            table[:, 0] = v_empty
            table[:, n] = v_full
            table[:, 1:n] = vals
            marg = np.take_along_axis(table, rank + 1, axis=1) - np.take_along_axis(table, rank, axis=1)
            pair_means.append(0.5 * (marg[:m] + marg[m:]))
            done += m
            bar.update(m * per_pair)
    finally:
        bar.close()
    y = np.concatenate(pair_means)
    values = y.mean(axis=0)
    stderr = y.std(axis=0, ddof=1) / math.sqrt(n_pairs)
    extra = {
        "efficiency": efficiency_report(values, v_full, v_empty, applies=True),
        "n_permutation_pairs": int(n_pairs),
        "seed": int(seed),
        "budget": int(budget),
        "seconds": time.perf_counter() - start_time,
    }
    return Scores(values, stderr, "mc-permutation", "shapley", 2 + n_pairs * per_pair, extra)


def allocate_strata(n: int, q: np.ndarray, samples_per_layer: int) -> tuple[np.ndarray, np.ndarray]:
    """Samples per coalition size for one layer: ``(m_s int64[n], exhaustive bool[n])``.

    Shares are proportional to ``q_s``; sizes whose ``C(n−1, s)`` subsets fit in their share (or number at
    most 2) are enumerated exactly, and their leftover share goes to the others; every sampled size gets ≥ 2.
    """
    counts = np.array([math.comb(n - 1, s) for s in range(n)], dtype=np.float64)
    active = q > 0
    exhaustive = np.zeros(n, dtype=bool)
    remaining = float(samples_per_layer)
    while True:
        total_q = q[active].sum()
        share = np.where(active, remaining * q / total_q if total_q > 0 else 0.0, 0.0)
        cap = active & ((share >= counts) | (counts <= 2))
        if not cap.any():
            break
        exhaustive |= cap
        active &= ~cap
        remaining -= counts[cap].sum()
        if not active.any():
            break
    m = np.zeros(n, dtype=np.int64)
    m[exhaustive] = counts[exhaustive].astype(np.int64)
    if active.any():
        base = np.floor(share[active]).astype(np.int64)
        leftover = int(max(0.0, remaining) - base.sum())
        order = np.argsort(-(share[active] - base), kind="stable")
        base[order[:leftover]] += 1
        m[active] = np.maximum(base, 2)
    return m, exhaustive


def stratified_semivalue(
    v: ValueFunction,
    n: int,
    budget: int,
    index: Index | None = None,
    *,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH,
    progress: bool | None = None,
) -> Scores:
    """Any semivalue (default: Shapley) by size-stratified sampling with ``budget`` evaluations.

    Each sample costs 2 evaluations (``v(S ∪ i)`` and ``v(S)``).

    Example:
        >>> s = stratified_semivalue(v, 32, 100_000, Index("semivalue", 1, 8), seed=1)  # doctest: +SKIP
    """
    _check_budget(budget)
    index = Index("shapley") if index is None else index
    index.validate(n)
    if n < 2:
        return exact_semivalue(v, n, index, progress=False)
    start_time = time.perf_counter()
    p = index.weights(n)
    q = np.array([p[s] * math.comb(n - 1, s) for s in range(n)], dtype=np.float64)
    m_s, exhaustive = allocate_strata(n, q, (budget - 2) // (2 * n))
    needed = 2 + 2 * n * int(m_s.sum())
    if needed > budget:
        minimum = 2 + 2 * n * sum(min(math.comb(n - 1, s), 2) for s in range(n) if q[s] > 0)
        raise LayershapError(
            f"budget {budget} is too small for size-stratified sampling of {index.name} on {n} layers "
            f"({int((q > 0).sum())} sizes per layer, >= 2 samples each); use --mc-evals {max(minimum, needed)} "
            "or more"
        )
    rng = np.random.default_rng(seed)
    v_full, v_empty = _ends(v, n)

    # one row per sample: stratum = (layer i, size s); exhaustive strata list their subsets explicitly
    sizes = np.flatnonzero(m_s > 0)
    layer_of = np.repeat(np.arange(n), int(m_s.sum()))
    size_of = np.tile(np.repeat(sizes, m_s[sizes]), n)
    offset_of = np.tile(np.concatenate([np.arange(m_s[s]) for s in sizes]), n)  # row's place in its stratum
    n_rows = len(layer_of)
    deltas = np.empty(n_rows, dtype=np.float64)
    # exhaustive strata: fixed subset lists, built per (i, s) in order
    enum_cache: dict[tuple[int, int], np.ndarray] = {}

    def exhaustive_masks(i: int, s: int) -> np.ndarray:
        key = (i, s)
        if key not in enum_cache:
            others = [j for j in range(n) if j != i]
            combos = list(itertools.combinations(others, s))
            out = np.zeros((len(combos), n), dtype=bool)
            for r, c in enumerate(combos):
                out[r, list(c)] = True
            enum_cache[key] = out
        return enum_cache[key]

    rows_per_chunk = max(1, batch_size // 2)
    show = 2 * n_rows > (1 << 16) if progress is None else progress
    bar = tqdm(total=2 * n_rows, desc=f"stratified {index.name} ({n} layers)", unit="eval", unit_scale=True,
               disable=not show, leave=False)
    try:
        for start in range(0, n_rows, rows_per_chunk):
            stop = min(start + rows_per_chunk, n_rows)
            li, si = layer_of[start:stop], size_of[start:stop]
            keys = rng.random((stop - start, n))
            keys[np.arange(stop - start), li] = 2.0  # layer i never joins S
            rank = np.argsort(np.argsort(keys, axis=1), axis=1)
            without = rank < si[:, None]
            # overwrite exhaustive strata with their explicit subset lists
            ex_rows = exhaustive[si]
            if ex_rows.any():
                for i, size in sorted({(int(a), int(b)) for a, b in zip(li[ex_rows], si[ex_rows])}):
                    rows = np.flatnonzero((li == i) & (si == size))
                    without[rows] = exhaustive_masks(i, size)[offset_of[start + rows]]
            with_i = without.copy()
            with_i[np.arange(stop - start), li] = True
            vals = evaluate(v, np.concatenate([with_i, without]))
            k = stop - start
            deltas[start:stop] = vals[:k] - vals[k:]
            bar.update(2 * k)
    finally:
        bar.close()

    stratum = layer_of * n + size_of
    counts = np.bincount(stratum, minlength=n * n).astype(np.float64)
    sums = np.bincount(stratum, weights=deltas, minlength=n * n)
    means = np.divide(sums, counts, out=np.zeros(n * n), where=counts > 0)
    sq = np.bincount(stratum, weights=(deltas - means[stratum]) ** 2, minlength=n * n)
    var = np.divide(sq, counts - 1, out=np.zeros(n * n), where=counts > 1)
    means = means.reshape(n, n)
    var = var.reshape(n, n)
    counts = counts.reshape(n, n)
    var[:, exhaustive] = 0.0
    values = means @ q
    var_phi = (var * q[None, :] ** 2 / np.where(counts > 0, counts, 1.0)).sum(axis=1)
    stderr = np.sqrt(var_phi)
    extra = {
        "efficiency": efficiency_report(values, v_full, v_empty, applies=index.is_shapley(n),
                                        sum_stderr=float(np.sqrt(var_phi.sum()))),
        "samples_per_size": {int(s): int(m_s[s]) for s in sizes},
        "exhaustive_sizes": [int(s) for s in np.flatnonzero(exhaustive)],
        "seed": int(seed),
        "budget": int(budget),
        "seconds": time.perf_counter() - start_time,
    }
    return Scores(values, stderr, "mc-stratified", index.name, 2 + 2 * n_rows, extra)
