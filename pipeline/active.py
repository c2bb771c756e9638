"""Active sampling: spend oracle passes where the surrogate ensemble disagrees, until the layer ranking is stable.

Loop (:func:`run_active_sampling`):

1. the store holds an initial stratified set (measured here if ``initial`` is given);
2. train a surrogate ensemble on every stored row and compute the layer scores with the index the data support
   (:func:`~layershap.shapley.semivalues.default_index`: the pruning-range semivalue over the removed-layer
   counts where the held-out metrics validate the surrogate);
3. **stop** when the ranking is stable: Kendall tau between consecutive rounds' scores >= ``tau`` *and* the same
   ``top_k`` least-important layers (the first ones a depth pruner removes), for ``stable_rounds`` consecutive
   round pairs, each round's index weighting only validated counts (a round whose metrics validate no count
   from 1 on scores leave-one-out, ``validated`` false, and never counts as stable); or when the store holds ``budget`` rows; or when no unmeasured mask is left in the range;
4. otherwise draw a pool of unmeasured candidate masks in the pruning range (removed-layer counts present in
   the store) and take ``batch`` of them where the members disagree most (:func:`member_disagreement`: the
   spread of the members' log-nll), an equal share per removed-layer count and, within a count, the largest
   spread of each band of predicted level; measure them (never a mask already stored), and go to 2.

The disagreement grows with the predicted level itself, so the level bands keep the picks off catastrophic
masks alone (see :mod:`layershap.sampling.active`, which holds the picks; ``benchmarks/active_picks.py``
compares both rules on the committed Gemma-3-270M surrogate).

Example:
    >>> report = run_active_sampling(evaluator, store, budget=300, initial=96, batch=32, seed=0)  # doctest: +SKIP
    >>> report["stopped"], report["oracle_passes"], report["ranking"]  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau

from layershap.core.errors import LayershapError
from layershap.oracle.evaluate import MaskedEvaluator
from layershap.oracle.measure import measure_masks
from layershap.oracle.store import DatasetStore
from layershap.sampling.active import available_masks, pick_uncertain
from layershap.sampling.stratified import stratified_masks
from layershap.shapley.estimate import compute_scores
from layershap.shapley.semivalues import default_index
from layershap.surrogate.checkpoint import Surrogate
from layershap.surrogate.metrics import not_validated
from layershap.surrogate.network import DEFAULT_HIDDEN
from layershap.surrogate.train import train_surrogate

DISAGREEMENT = ("sample std over the members of log(predicted nll); picks: an equal share per removed-layer "
                "count, within a count the largest spread of each band of the ensemble's predicted log-nll")


def member_disagreement(surrogate: Surrogate) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``masks -> (spread, level)``: the sample std over the members of their predicted ``log(nll)`` (members
    learn standardized log-nll, so this is their natural disagreement) and the members' mean ``log(nll)``.

    Example:
        >>> spread, level = member_disagreement(surrogate)(masks)     # float64[k] each  # doctest: +SKIP
    """
    if surrogate.members < 2:
        raise LayershapError("member disagreement needs an ensemble of at least 2 members")

    def rate(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logs = np.log(np.stack([surrogate.member(j).predict_nll(masks) for j in range(surrogate.members)]))
        return logs.std(axis=0, ddof=1), logs.mean(axis=0)

    return rate


def stable(history: list[dict], tau: float, top_k: int, stable_rounds: int) -> bool:
    """True when the last ``stable_rounds`` round-to-round comparisons all have tau >= ``tau`` and the same top-k,
    each on scores whose index weights only removed-layer counts the held-out metrics validate.

    ``history`` rows carry ``tau`` (None for the first round), ``same_top_k`` and ``validated`` (missing = True).

    Example:
        >>> stable([{"tau": None}, {"tau": 0.97, "same_top_k": True}, {"tau": 0.99, "same_top_k": True}], 0.95, 5, 2)
        True
    """
    if stable_rounds < 1 or len(history) < stable_rounds + 1:
        return False
    last = history[-stable_rounds:]
    return all(h["tau"] is not None and h["tau"] >= tau and h["same_top_k"] and h.get("validated", True)
               for h in last)


def run_active_sampling(
    evaluator: MaskedEvaluator,
    store: DatasetStore,
    *,
    budget: int,
    initial: int | None = None,
    batch: int = 32,
    seed: int = 0,
    members: int = 8,
    hidden: int = DEFAULT_HIDDEN,
    pool: int = 4096,
    tau: float = 0.9,
    top_k: int = 5,
    stable_rounds: int = 2,
    removed: Sequence[int] | None = None,
    out_dir: str | Path | None = None,
    train_options: dict | None = None,
    progress: bool = True,
) -> dict:
    """Add oracle masks where the surrogate ensemble disagrees until the layer ranking is stable (see module doc).

    ``evaluator``: anything with ``n_layers`` and ``nll(masks) -> float64[k]`` (a MaskedEvaluator); ``store``:
    the DatasetStore it fills. ``budget``: total rows the store may hold (oracle passes, earlier runs included).
    ``initial``: size of the initial stratified set (full model and leave-one-out included), measured first
    when missing; ``None`` uses the rows already stored. ``batch``: masks added per round. ``members`` >= 2
    (the spread needs several members). Surrogates of each round go to ``out_dir/round_XX`` (default: an
    ``active`` folder next to the store). ``train_options``: extra keywords for ``train_surrogate``.

    Returns a JSON-ready dict: ``stopped`` ("stable" | "budget" | "exhausted"), ``oracle_passes`` (masks measured
    by this call), ``rows``, ``rounds`` (per round: rows, index, validated and the unvalidated weighted counts
    with why, tau, same_top_k, top_k, mean spread of the chosen
    masks (log-nll), masks added, seconds), final ``scores``, ``ranking`` (least important first), ``index``,
    ``surrogate_dir`` and the ``criterion``.

    Example:
        >>> run_active_sampling(evaluator, store, budget=300, seed=0)["stopped"]  # doctest: +SKIP
        'stable'
    """
    n = int(evaluator.n_layers)
    if n != store.n_layers:
        raise LayershapError(f"the oracle has {n} layers but the store holds {store.n_layers}-layer masks")
    if members < 2:
        raise LayershapError(f"active sampling needs an ensemble to measure disagreement: members >= 2, got {members}")
    if batch < 1 or budget < 1 or pool < 1 or top_k < 1 or stable_rounds < 1:
        raise LayershapError("budget, batch, pool, top_k and stable_rounds must all be >= 1")
    if not 0.0 < tau <= 1.0:
        raise LayershapError(f"tau must be in (0, 1], got {tau}")
    out = Path(out_dir) if out_dir is not None else Path(store.path).parent / "active"
    started_rows = len(store)
    passes = 0

    if initial is not None:
        masks0 = stratified_masks(n, initial, seed=seed, removed=removed)
        todo = masks0[store.missing(masks0)][: max(budget - len(store), 0)]
        passes += measure_masks(evaluator, store, todo, progress=progress)
    if len(store) == 0:
        raise LayershapError("the store is empty: measure an initial stratified set first, or pass initial=N")
    stored_removed = sorted({int(r) for r in (~store.masks).sum(axis=1)} - {0})
    strata = list(removed) if removed is not None else stored_removed
    if not strata:
        raise LayershapError("the store holds no mask with a removed layer; measure an initial stratified set first")

    history: list[dict] = []
    previous = None
    stopped = "budget"
    scores = None
    surrogate_dir = None
    round_no = 0
    while True:
        t0 = time.perf_counter()
        surrogate_dir = out / f"round_{round_no:02d}"
        surrogate = train_surrogate(store, surrogate_dir, members=members, seed=seed, hidden=hidden,
                                    progress=progress, **(train_options or {}))
        excluded = not_validated(surrogate.metadata) or {}
        index = default_index(surrogate.removed_counts, n, excluded)
        scores = compute_scores(surrogate, n, index, method="auto", seed=seed, progress=False)
        ranking = scores.ranking()
        unvalidated = {str(r): why for r, why in excluded.items() if r in index.removed_counts_used(n)}
        entry = {"round": round_no, "rows": len(store), "index": scores.index, "validated": not unvalidated,
                 "not_validated": unvalidated, "tau": None, "same_top_k": False, "top_k": ranking[:top_k].tolist(),
                 "added": 0, "mean_log_spread_chosen": None}
        if previous is not None:
            entry["tau"] = float(kendalltau(previous.values, scores.values).statistic)
            entry["same_top_k"] = set(previous.ranking()[:top_k].tolist()) == set(ranking[:top_k].tolist())
        history.append(entry)
        previous = scores
        if stable(history, tau, top_k, stable_rounds):
            stopped = "stable"
        elif len(store) >= budget:
            stopped = "budget"
        elif available_masks(store.masks, n, strata) == 0:
            stopped = "exhausted"
        else:
            stopped = None
        if stopped is not None:
            entry["seconds"] = round(time.perf_counter() - t0, 3)
            break

        picked, spread = pick_uncertain(store.masks, n, strata, member_disagreement(surrogate),
                                        min(batch, budget - len(store)), pool=pool, seed=seed + 1 + round_no)
        if store.missing(picked).sum() != len(picked):  # stratified_masks(exclude=...) guarantees this
            raise RuntimeError("active sampling picked a mask that is already stored")
        passes += measure_masks(evaluator, store, picked, progress=progress)
        entry["added"] = len(picked)
        entry["mean_log_spread_chosen"] = float(spread.mean())
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        round_no += 1

    return {
        "stopped": stopped,
        "oracle_passes": passes,
        "rows_before": started_rows,
        "rows": len(store),
        "budget": budget,
        "rounds": history,
        "scores": scores.values.tolist(),
        "stderr": scores.stderr.tolist(),
        "index": scores.index,
        "ranking": scores.ranking().tolist(),
        "surrogate_dir": str(surrogate_dir),
        "strata": strata,
        "disagreement": DISAGREEMENT,
        "criterion": {"tau": tau, "top_k": top_k, "stable_rounds": stable_rounds,
                      "rule": f"Kendall tau >= {tau} and the same {top_k} least-important layers between "
                              f"consecutive rounds, {stable_rounds} times in a row"},
    }
