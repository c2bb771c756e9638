"""Depth-pruning plans: the best set of K layers to remove, searched directly with the oracle in the loop.

Scores (Shapley values, semivalues) say how much a layer matters on average; which K layers to remove
*together* is decided by the interactions among the removed layers, so a plan is searched for over removal sets
of size K, and every set it recommends was measured:

1. the rows the store already holds are free; the full model and every leave-one-out row are measured first;
2. a focused initial sample per K: the K layers with the lowest leave-one-out nll (the cheap peer pick) and
   sets drawn with layer weights ``exp(-leave-one-out damage / temperature)`` (sets with a cornerstone layer
   waste passes);
3. each round: fit the proposal model (default: :class:`~layershap.surrogate.pairwise.PairwiseModel` on the rows
   with at most ``max(ks) + 1`` layers removed), rank every removal set of size K by predicted nll
   (exhaustive up to 200,000 sets, beam search beyond) plus the one-swap neighbours of the best measured set
   and the best measured (K-1)-set grown by one layer, and measure the best few not measured yet: every K's
   best neighbour first, then the ranked sets round-robin over K, so a round the budget cuts short still
   serves the largest K;
4. stop when every K's best measured set has stayed the same for ``patience`` rounds, or the pass budget is
   spent; no mask is measured twice (the oracle answers stored rows from the store);
5. measure the ``top_validate`` best sets of each K on validation windows disjoint from the calibration windows
   and choose the one with the lowest nll over both window sets (as many validation as calibration windows):
   every measured token counts, so a 0.02-nat wobble of a few validation windows cannot overturn a clear
   calibration result, while a set that only looked good on the calibration windows loses.

Example:
    >>> result = find_plans(oracle, ks=[1, 2, 3, 4], budget=90, validation=validation_oracle.loss)
    >>> result.plans[2].removed, result.plans[2].nll, result.plans[2].validation_nll
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from layershap.core.errors import LayershapError
from layershap.core.masks import check_removal_count, masks_from_removed
from layershap.surrogate.pairwise import PairwiseModel

Predictor = Callable[[np.ndarray], np.ndarray]  # masks bool[k, n] -> predicted nll float[k]
Fit = Callable[[np.ndarray, np.ndarray, int], Predictor]  # (masks, nll, max_removed) -> predictor
MAX_EXHAUSTIVE = 200_000
BEAM_WIDTH = 256


class RowOracle(Protocol):
    """Measured rows plus measuring: ``loss`` measures what it does not know yet, ``rows`` returns all it knows."""

    n_layers: int

    def loss(self, masks: np.ndarray) -> np.ndarray: ...

    def rows(self) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class PlanCandidate:
    """A measured removal set: calibration nll and, once validated, its nll on the validation windows."""

    removed: tuple[int, ...]
    nll: float
    validation_nll: float | None = None


@dataclass
class PlanResult:
    """The chosen plan per K, the measured candidates per K (lowest calibration nll first) and the round log."""

    plans: dict[int, PlanCandidate]
    candidates: dict[int, list[PlanCandidate]]
    rounds: list[dict] = field(default_factory=list)
    passes: int = 0
    validation_passes: int = 0
    stopped: str = ""

    def to_dict(self) -> dict:
        """JSON-ready: plans and the validated candidates per K, passes, rounds, why the loop stopped."""
        return {"plans": {str(k): asdict(p) for k, p in self.plans.items()},
                "validated": {str(k): [asdict(c) for c in cands if c.validation_nll is not None]
                              for k, cands in self.candidates.items()},
                "passes": self.passes, "validation_passes": self.validation_passes, "stopped": self.stopped,
                "rounds": self.rounds}


def fit_pairwise(masks: np.ndarray, nll: np.ndarray, max_removed: int) -> Predictor:
    """The default proposal model: :class:`PairwiseModel` on the rows with at most ``max_removed`` removed."""
    return PairwiseModel.fit(masks, nll, max_removed=max_removed).predict_nll


def removal_set(mask: np.ndarray) -> tuple[int, ...]:
    """The removed layers of one mask, sorted."""
    return tuple(int(i) for i in np.flatnonzero(~np.asarray(mask, dtype=bool)))


def loo_damage(masks: np.ndarray, nll: np.ndarray) -> np.ndarray:
    """Each layer's leave-one-out nll increase over the full model; ``nan`` where a row is missing."""
    n = masks.shape[1]
    full = masks.all(axis=1)
    damage = np.full(n, np.nan)
    single = (~masks).sum(axis=1) == 1
    if full.any():
        for m, v in zip(masks[single], nll[single]):
            damage[int(np.flatnonzero(~m)[0])] = v - float(nll[full][0])
    return damage


def focused_sets(damage: np.ndarray, k: int, count: int, rng: np.random.Generator, temperature: float,
                 exclude: set[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Up to ``count`` new removal sets of size ``k``, layers drawn without replacement with weights
    ``exp(-damage / temperature)`` (low leave-one-out damage = likely); sets in ``exclude`` are skipped."""
    n = len(damage)
    filled = np.where(np.isfinite(damage), damage, np.nanmax(damage) if np.isfinite(damage).any() else 0.0)
    logits = -filled / temperature
    weights = np.exp(logits - logits.max())
    weights /= weights.sum()
    out: list[tuple[int, ...]] = []
    seen = set(exclude)
    for _ in range(50 * count):
        if len(out) >= count or len(seen) - len(exclude) >= math.comb(n, k):
            break
        s = tuple(sorted(int(i) for i in rng.choice(n, size=k, replace=False, p=weights)))
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def ranked_sets(predict: Predictor, n: int, k: int, top: int) -> list[tuple[int, ...]]:
    """The ``top`` removal sets of size ``k`` with the lowest predicted nll: exhaustive when C(n, k) is at most
    :data:`MAX_EXHAUSTIVE`, else beam search (width :data:`BEAM_WIDTH`, one layer added per step)."""
    if math.comb(n, k) <= MAX_EXHAUSTIVE:
        sets = np.array(list(itertools.combinations(range(n), k)), dtype=np.int64).reshape(-1, k)
    else:
        frontier = np.zeros((1, 0), dtype=np.int64)
        for size in range(1, k + 1):
            grown = sorted({tuple(sorted((*s, j))) for s in frontier.tolist() for j in range(n) if j not in s})
            grown_arr = np.array(grown, dtype=np.int64).reshape(-1, size)
            pred = predict(masks_from_removed(grown_arr, n))
            frontier = grown_arr[np.argsort(pred, kind="stable")[: max(BEAM_WIDTH, top)]]
        sets = frontier
    pred = predict(masks_from_removed(sets, n))
    return [tuple(int(i) for i in sets[j]) for j in np.argsort(pred, kind="stable")[:top]]


def neighbours(best: tuple[int, ...], smaller: tuple[int, ...] | None, n: int) -> list[tuple[int, ...]]:
    """One-swap neighbours of ``best`` and the sets ``smaller + {j}`` (the best (K-1)-set grown by one layer)."""
    kept = [j for j in range(n) if j not in best]
    out = {tuple(sorted((set(best) - {i}) | {j})) for i in best for j in kept}
    if smaller is not None:
        out |= {tuple(sorted((*smaller, j))) for j in range(n) if j not in smaller}
    return sorted(out)


def _by_k(masks: np.ndarray, nll: np.ndarray, ks: Sequence[int]) -> dict[int, list[PlanCandidate]]:
    removed = (~masks).sum(axis=1)
    out = {}
    for k in ks:
        rows = np.flatnonzero(removed == k)
        rows = rows[np.lexsort((np.arange(len(rows)), nll[rows]))]
        out[k] = [PlanCandidate(removal_set(masks[i]), float(nll[i])) for i in rows]
    return out


def find_plans(
    oracle: RowOracle,
    ks: Sequence[int],
    *,
    fit: Fit = fit_pairwise,
    budget: int = 90,
    per_round: int = 3,
    init_per_k: int = 6,
    patience: int = 2,
    temperature: float = 0.5,
    validation: Callable[[np.ndarray], np.ndarray] | None = None,
    top_validate: int = 3,
    seed: int = 0,
    progress: bool = True,
) -> PlanResult:
    """The best removal set per K (module docstring). ``budget``: new oracle passes on the calibration windows at
    most (stored rows are free; 0 = choose among the stored rows only); ``per_round``: model-ranked new sets per K per round (plus one neighbour);
    ``validation``: nll on validation windows; the plan is the one of the ``top_validate`` best measured sets
    with the lowest calibration + validation nll.

    Example:
        >>> res = find_plans(oracle, [1, 2, 3], budget=60, validation=validation_oracle.loss, progress=False)
        >>> {k: p.removed for k, p in res.plans.items()}
    """
    n = oracle.n_layers
    ks = sorted({check_removal_count(int(k), n) for k in ks})
    if not ks:
        raise LayershapError("give at least one number of layers to remove")
    if budget < 0:
        raise LayershapError(f"the plan budget must be >= 0 oracle passes, got {budget}")
    for name, value in (("per_round", per_round), ("patience", patience), ("top_validate", top_validate)):
        if value < 1:
            raise LayershapError(f"{name} must be >= 1, got {value}")
    rng = np.random.default_rng(seed)
    spent = 0

    def measure(sets: list[tuple[int, ...]]) -> int:
        nonlocal spent
        known = {removal_set(m) for m in oracle.rows()[0]}
        todo = [s for s in dict.fromkeys(sets) if s not in known][: max(0, budget - spent)]
        if todo:
            oracle.loss(masks_from_removed(todo, n))
            spent += len(todo)
        return len(todo)

    measure([()] + [(i,) for i in range(n)])
    masks, nll = oracle.rows()
    damage = loo_damage(masks, nll)
    known = {removal_set(m) for m in masks}
    initial: list[tuple[int, ...]] = []
    for k in sorted({*ks, min(ks[-1] + 1, n - 1)} - {1}):
        initial.append(tuple(sorted(int(i) for i in np.argsort(damage, kind="stable")[:k])))
        initial += focused_sets(damage, k, init_per_k, rng, temperature, known | set(initial))
    measure(initial)

    rounds: list[dict] = []
    best_prev: dict[int, tuple[int, ...]] = {}
    unchanged = dict.fromkeys(ks, 0)
    stopped = "budget spent"
    max_removed = min(ks[-1] + 1, n - 1)
    with tqdm(total=budget, initial=min(spent, budget), desc="plans", unit="pass", disable=not progress) as bar:
        while spent < budget:
            masks, nll = oracle.rows()
            predict = fit(masks, nll, max_removed)
            by_k, known = _by_k(masks, nll, ks), {removal_set(m) for m in masks}
            local: list[tuple[int, ...]] = []  # per K: the predicted best neighbour of the best measured set
            ranked: list[list[tuple[int, ...]]] = []  # per K: the best unmeasured sets, best first
            for k in ks:
                if k == 1:
                    continue  # every single-layer removal is measured
                fresh = [s for s in ranked_sets(predict, n, k, per_round + len(known)) if s not in known]
                ranked.append(fresh[:per_round])
                smaller = by_k[k - 1][0].removed if k - 1 in by_k and by_k[k - 1] else None
                if by_k[k]:
                    near = [s for s in neighbours(by_k[k][0].removed, smaller, n)
                            if s not in known and s not in ranked[-1]]
                    if near:
                        local.append(near[int(np.argmin(predict(masks_from_removed(near, n))))])
            # Priority order, so that a round cut short by the budget still serves every K: each K's local step
            # first, then the ranked sets round-robin over K (best of each K, then second best, ...).
            asked = local + [s for picks in itertools.zip_longest(*ranked) for s in picks if s is not None]
            added = measure(asked)
            bar.update(added)
            masks, nll = oracle.rows()
            by_k = _by_k(masks, nll, ks)
            for k in ks:
                best = by_k[k][0].removed if by_k[k] else None
                unchanged[k] = unchanged[k] + 1 if best is not None and best == best_prev.get(k) else 0
                if best is not None:
                    best_prev[k] = best
            rounds.append({"round": len(rounds) + 1, "passes": spent, "measured": added,
                           "best": {str(k): [list(by_k[k][0].removed), by_k[k][0].nll] for k in ks if by_k[k]}})
            if added == 0:
                stopped = "no unmeasured candidate left"
                break
            if all(v >= patience for v in unchanged.values()):
                stopped = f"best sets unchanged for {patience} rounds"
                break

    masks, nll = oracle.rows()
    by_k = _by_k(masks, nll, ks)
    plans: dict[int, PlanCandidate] = {}
    validation_passes = 0
    for k in ks:
        if not by_k[k]:
            raise LayershapError(f"no removal set of {k} layers could be measured within the budget of {budget} "
                                 f"passes; raise the budget")
        top = by_k[k][:top_validate]
        if validation is not None:
            vals = np.asarray(validation(masks_from_removed([c.removed for c in top], n)), dtype=np.float64)
            validation_passes += len(top)
            top = [PlanCandidate(c.removed, c.nll, float(v)) for c, v in zip(top, vals)]
            by_k[k][: len(top)] = top
            plans[k] = min(top, key=lambda c: (c.nll + c.validation_nll, c.nll))
        else:
            plans[k] = top[0]
    return PlanResult(plans, by_k, rounds, spent, validation_passes, stopped)
