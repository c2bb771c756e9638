"""Depth-pruning plans: the best set of K layers to remove, searched with the oracle in the loop and decided on
fresh tokens.

Scores (Shapley values, semivalues) say how much a layer matters on average; which K layers to remove *together*
is decided by the interactions among the removed layers, so a plan is searched for over removal sets of size K,
and every set it recommends was measured. Two fidelities (:mod:`layershap.pruning.budget`):

**Screening** on the calibration windows (cheap, noisy):

1. the rows the store already holds are free; the full model and every leave-one-out row are measured first;
2. a focused initial sample per K: the K layers with the lowest leave-one-out loss (the cheap peer pick) and
   sets drawn with layer weights ``exp(-leave-one-out damage / temperature)`` (sets with a cornerstone layer
   waste passes);
3. each round: fit the proposal model (:class:`~layershap.surrogate.pairwise.PairwiseModel` on the rows with at
   most ``max(ks) + 1`` layers removed), rank every removal set of size K by predicted loss (exhaustive up to
   200,000 sets, beam search beyond, scored by index), and measure, for each K still searching, the predicted
   best one-swap neighbour of its best measured set (or the best (K-1)-set grown by one layer) and its best
   unmeasured ranked sets: every K's neighbour first, then the ranked sets round-robin over K, so a round the
   budget cuts short still serves the largest K;
4. a K stops searching when its best measured set has stayed the same for ``patience`` rounds or its share of
   the budget is spent; no mask is measured twice (the oracle answers stored rows from the store).

**Decision** on blocks of fresh windows (:mod:`layershap.pruning.race`): the best screened sets of each K (at most
``budget.candidates``, and only those within the screening noise of the best) race block by block; the plan is
the race's winner, with how sure the choice is (its lead over the runner-up in standard errors). Without
decision blocks the plan is the best screened set.

Example:
    >>> result = find_plans(oracle, [1, 2, 3, 4], plan_budget(18, [1, 2, 3, 4]), decide=[b.window_loss for b in blocks])  # doctest: +SKIP
    >>> result.plans[2].removed, result.plans[2].decision_loss, result.races[2].margin_se  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from layershap.core.errors import LayershapError
from layershap.core.masks import check_removal_count, masks_from_removed
from layershap.oracle.measurement import log_offset
from layershap.surrogate.pairwise import PairwiseModel

from .budget import INITIAL_PER_K, PlanBudget
from .candidates import focused_sets, loo_damage, neighbours, ranked_sets
from .race import RaceResult, WindowLoss, race

Z_SCREEN = 3.0  # screening standard errors behind the best within which a set still enters the race


class RowOracle(Protocol):
    """Measured rows plus measuring: ``loss`` measures what it does not know yet, ``rows`` returns all it knows;
    ``window_loss`` (optional) gives per-window values for the screening noise estimate."""

    n_layers: int

    def loss(self, masks: np.ndarray) -> np.ndarray: ...

    def rows(self) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class PlanCandidate:
    """A measured removal set: its screening loss and, once raced, its mean loss on the decision blocks."""

    removed: tuple[int, ...]
    loss: float
    decision_loss: float | None = None
    blocks: int = 0


@dataclass
class PlanResult:
    """The chosen plan per K, the measured candidates per K (lowest screening loss first), each K's race, the
    round log and what was spent (``passes``: new screening passes; ``spent``: the screening share granted per K
    so far; decision passes and tokens)."""

    plans: dict[int, PlanCandidate]
    candidates: dict[int, list[PlanCandidate]]
    races: dict[int, RaceResult] = field(default_factory=dict)
    rounds: list[dict] = field(default_factory=list)
    passes: int = 0
    spent: dict[int, int] = field(default_factory=dict)
    decision_passes: int = 0
    decision_tokens: int = 0
    screen_noise: float | None = None
    stopped: str = ""

    def to_dict(self) -> dict:
        """JSON-ready: plans, races, passes, the round log, why the search stopped."""
        return {"plans": {str(k): asdict(p) for k, p in self.plans.items()},
                "races": {str(k): r.to_dict() for k, r in self.races.items()},
                "passes": self.passes, "spent": {str(k): v for k, v in self.spent.items()},
                "decision_passes": self.decision_passes, "decision_tokens": self.decision_tokens,
                "screen_noise": self.screen_noise, "stopped": self.stopped, "rounds": self.rounds}


def removal_set(mask: np.ndarray) -> tuple[int, ...]:
    """The removed layers of one mask, sorted."""
    return tuple(int(i) for i in np.flatnonzero(~np.asarray(mask, dtype=bool)))


def by_k(masks: np.ndarray, loss: np.ndarray, ks: Sequence[int]) -> dict[int, list[PlanCandidate]]:
    """The measured sets of each K, lowest loss first (ties: first measured first)."""
    removed = (~masks).sum(axis=1)
    out = {}
    for k in ks:
        rows = np.flatnonzero(removed == k)
        rows = rows[np.lexsort((np.arange(len(rows)), loss[rows]))]
        out[k] = [PlanCandidate(removal_set(masks[i]), float(loss[i])) for i in rows]
    return out


def screen_noise(oracle: RowOracle, masks: np.ndarray, max_removed: int) -> float | None:
    """Standard deviation of one window's loss difference to the full model, pooled over the measured sets with
    at most ``max_removed`` layers removed (None without per-window values): the noise of a screening pass."""
    window_loss = getattr(oracle, "window_loss", None)
    full = np.ones((1, masks.shape[1]), dtype=bool)
    near = masks[((~masks).sum(axis=1) <= max_removed) & ~masks.all(axis=1)]
    if window_loss is None or len(near) < 2:
        return None
    diffs = np.asarray(window_loss(near)) - np.asarray(window_loss(full))[0]
    diffs = diffs[np.isfinite(diffs).all(axis=1)]
    if diffs.shape[0] < 2 or diffs.shape[1] < 2:
        return None
    return float(np.sqrt(np.mean(np.var(diffs, axis=1, ddof=1))))


def contenders(cands: list[PlanCandidate], most: int, noise: float | None, windows: int) -> list[PlanCandidate]:
    """The best ``most`` screened sets, keeping only those within :data:`Z_SCREEN` screening standard errors of
    the best (a difference of two sets' means over ``windows`` windows has s.e. ``noise * sqrt(2 / windows)``)."""
    top = cands[:most]
    if noise is None or not top or windows < 1:
        return top
    margin = Z_SCREEN * noise * math.sqrt(2.0 / windows)
    return [c for c in top if c.loss - top[0].loss <= margin]


def find_plans(
    oracle: RowOracle,
    ks: Sequence[int],
    budget: PlanBudget,
    *,
    decide: Sequence[WindowLoss] | None = None,
    spent: dict[int, int] | None = None,
    utility: str = "nll",
    per_round: int = 3,
    patience: int = 2,
    temperature: float = 0.5,
    seed: int = 0,
    progress: bool = True,
) -> PlanResult:
    """The best removal set per K (module docstring).

    ``budget``: passes of the search (leave-one-out, then ``INITIAL_PER_K + search_per_k`` new screening passes
    per K) and of its races (``candidates`` sets per K on at most ``max_blocks`` of the ``decide`` blocks);
    stored rows are free. ``spent``: the screening share each K was granted by earlier calls on the same store
    (``PlanResult.spent`` of the last call: a finished call grants every K its whole share, so a rerun with the
    same budget measures nothing new, and a larger budget or a new K gets the difference). ``utility``: the loss's name (``nll``, ``kl``), for the proposal
    model's log scale. ``decide``: per-window loss functions of the decision blocks (None: the plan is the best
    screened set).

    Example:
        >>> res = find_plans(oracle, [1, 2, 3], plan_budget(18, [1, 2, 3]), decide=blocks, progress=False)  # doctest: +SKIP
        >>> {k: p.removed for k, p in res.plans.items()}  # doctest: +SKIP
    """
    n = oracle.n_layers
    ks = sorted({check_removal_count(int(k), n) for k in ks})
    if not ks:
        raise LayershapError("give at least one number of layers to remove")
    for name, value in (("per_round", per_round), ("patience", patience)):
        if value < 1:
            raise LayershapError(f"{name} must be >= 1, got {value}")
    if budget.n_layers != n:
        raise LayershapError(f"the plan budget was sized for {budget.n_layers} layers, the model has {n}")
    rng = np.random.default_rng(seed)
    top_k = ks[-1]
    above = min(top_k + 1, n - 1)  # the (K + 1)-sets of the largest K, which the proposal model learns from
    shares = {k: 0 if k == 1 else INITIAL_PER_K + budget.search_per_k for k in ks}
    shares.setdefault(above, INITIAL_PER_K)
    allowance = {k: v - int((spent or {}).get(k, 0)) for k, v in shares.items()}
    used = dict.fromkeys(allowance, 0)
    passes = 0

    def owner(s: tuple[int, ...]) -> int:
        return len(s)

    def measure(sets: list[tuple[int, ...]], free: bool = False) -> int:
        nonlocal passes
        known = {removal_set(m) for m in oracle.rows()[0]}
        todo = []
        for s in dict.fromkeys(sets):
            k = owner(s)
            if s in known or (not free and used.get(k, 0) >= allowance.get(k, 0)):
                continue
            todo.append(s)
            if not free:
                used[k] += 1
        if todo:
            oracle.loss(masks_from_removed(todo, n))
            passes += len(todo)
        return len(todo)

    measure([()] + [(i,) for i in range(n)], free=True)  # the leave-one-out rows every plan starts from
    masks, loss = oracle.rows()
    damage = loo_damage(masks, loss)
    known = {removal_set(m) for m in masks}
    initial: list[tuple[int, ...]] = []
    for k in sorted({*ks, above} - {1}):
        initial.append(tuple(sorted(int(i) for i in np.argsort(damage, kind="stable")[:k])))
        initial += focused_sets(damage, k, INITIAL_PER_K - 1, rng, temperature, known | set(initial))
    measure(initial)

    rounds: list[dict] = []
    best_prev: dict[int, tuple[int, ...]] = {}
    unchanged = dict.fromkeys(ks, 0)
    searching = [k for k in ks if k > 1]
    stopped = "every K stable" if not searching else "budget spent"
    max_removed = above
    offset = log_offset(utility)
    total = sum(allowance[k] for k in searching)
    with tqdm(total=total, initial=min(sum(used.values()), total), desc="plans", unit="pass",
              disable=not progress) as bar:
        while searching:
            masks, loss = oracle.rows()
            model = PairwiseModel.fit(masks, loss, max_removed=max_removed, offset=offset)
            candidates, known = by_k(masks, loss, ks), {removal_set(m) for m in masks}
            local: list[tuple[int, ...]] = []  # per K: the predicted best neighbour of the best measured set
            ranked: list[list[tuple[int, ...]]] = []  # per K: the best unmeasured sets, best first
            for k in searching:
                fresh = [s for s in ranked_sets(model, n, k, per_round + len(known)) if s not in known]
                ranked.append(fresh[:per_round])
                smaller = candidates[k - 1][0].removed if k - 1 in candidates and candidates[k - 1] else None
                if candidates[k]:
                    near = [s for s in neighbours(candidates[k][0].removed, smaller, n)
                            if s not in known and s not in ranked[-1]]
                    if near:
                        local.append(near[int(np.argmin(model.predict_sets(np.array(near))))])
            # Priority order, so that a round cut short by the budget still serves every K: each K's local step
            # first, then the ranked sets round-robin over K (best of each K, then second best, ...).
            asked = local + [s for picks in itertools.zip_longest(*ranked) for s in picks if s is not None]
            before = sum(used.values())
            added = measure(asked)
            bar.update(sum(used.values()) - before)
            masks, loss = oracle.rows()
            candidates = by_k(masks, loss, ks)
            for k in ks:
                best = candidates[k][0].removed if candidates[k] else None
                unchanged[k] = unchanged[k] + 1 if best is not None and best == best_prev.get(k) else 0
                if best is not None:
                    best_prev[k] = best
            rounds.append({"round": len(rounds) + 1, "passes": passes, "measured": added,
                           "best": {str(k): [list(candidates[k][0].removed), candidates[k][0].loss]
                                    for k in ks if candidates[k]}})
            searching = [k for k in searching if unchanged[k] < patience and used[k] < allowance[k]]
            if added == 0:
                stopped = "no unmeasured candidate left" if searching else stopped
                break
        else:
            stopped = "every K stable" if all(unchanged[k] >= patience for k in ks if k > 1) else "budget spent"

    masks, loss = oracle.rows()
    candidates = by_k(masks, loss, ks)
    noise = screen_noise(oracle, masks, max_removed)
    windows = int(getattr(oracle, "n_windows", 0) or 0)
    result = PlanResult({}, candidates, rounds=rounds, passes=passes,
                        spent={k: max(shares[k], int((spent or {}).get(k, 0))) for k in shares}, screen_noise=noise,
                        stopped=stopped)
    for k in ks:
        if not candidates[k]:
            raise LayershapError(f"no removal set of {k} layers was measured within the budget; raise the budget")
        if not decide:
            result.plans[k] = candidates[k][0]
            continue
        entrants = contenders(candidates[k], budget.candidates, noise, windows)
        outcome = race([c.removed for c in entrants], list(decide)[: budget.max_blocks], n,
                       block_tokens=budget.block_tokens)
        result.races[k] = outcome
        result.decision_passes += outcome.passes
        result.decision_tokens += outcome.tokens
        screened = {c.removed: c for c in candidates[k]}
        raced = [PlanCandidate(s, screened[s].loss, outcome.loss[s], outcome.blocks_run[s]) for s in outcome.loss]
        candidates[k] = raced + [c for c in candidates[k] if c.removed not in outcome.loss]
        result.plans[k] = next(c for c in raced if c.removed == outcome.winner)
    return result
