"""Choosing among a few measured removal sets on fresh tokens: a race over blocks of decision windows.

Screening measurements pick the contenders but are too few tokens to order them (their differences are often
within the noise of a few hundred tokens) and they are biased upwards for the winner (it was picked on them). The
race measures every surviving contender on one block of fresh windows at a time (disjoint from the calibration
windows and from each other) and, after each block, compares each contender with the leader **window by window**
on every block both have: with per-window differences ``d``, the gap is ``mean(d)`` and its standard error
``std(d) / sqrt(len(d))``. A contender further behind the leader than the gap a one-sided test at the normal
quantile ``z`` allows (Student's t with ``len(d) - 1`` degrees of freedom, since blocks hold few windows) drops
out; the race ends when one set is left or the blocks run out. How many tokens a decision takes therefore follows the measured
noise: clear choices stop after one block, close ones use every block.

Each result says how sure it is: the winner's gap to the runner-up in standard errors (``margin_se``; large =
sure, below ``z`` = not separated, either set is as good within the noise of the tokens measured).

Example:
    >>> res = race([(7, 8), (8, 9), (6, 7)], blocks=[block0.window_loss, block1.window_loss], n_layers=18)  # doctest: +SKIP
    >>> res.winner, res.margin_se, res.tokens  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import norm as normal
from scipy.stats import t as student_t

from layershap.core.errors import LayershapError
from layershap.core.masks import masks_from_removed

WindowLoss = Callable[[np.ndarray], np.ndarray]  # masks bool[k, n] -> per-window losses float64[k, W]
Z_DROP = 2.0  # standard errors behind the leader that end a contender's race


@dataclass
class RaceResult:
    """The winner of a race, every contender's mean decision loss over the blocks it ran, and how sure the choice
    is. ``blocks_run[s]``: blocks set ``s`` was measured on; ``dropped[s]``: the block after which it dropped out."""

    winner: tuple[int, ...]
    loss: dict[tuple[int, ...], float]
    blocks_run: dict[tuple[int, ...], int]
    runner_up: tuple[int, ...] | None = None
    gap: float | None = None
    gap_se: float | None = None
    passes: int = 0
    tokens: int = 0
    dropped: dict[tuple[int, ...], int] = field(default_factory=dict)

    @property
    def margin_se(self) -> float | None:
        """The winner's lead over the runner-up in standard errors (inf when no window disagrees)."""
        if self.gap is None or self.gap_se is None:
            return None
        return math.inf if self.gap_se == 0 else self.gap / self.gap_se

    def to_dict(self) -> dict:
        return {"winner": list(self.winner), "runner_up": None if self.runner_up is None else list(self.runner_up),
                "gap": self.gap, "gap_se": self.gap_se, "margin_se": self.margin_se, "passes": self.passes,
                "tokens": self.tokens,
                "contenders": [{"removed": list(s), "decision_loss": v, "blocks": self.blocks_run[s],
                                "dropped_after_block": self.dropped.get(s)} for s, v in self.loss.items()]}


def paired_gap(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of ``a - b`` over the windows both have (NaN-free): ``(gap, se)``.

    Example:
        >>> paired_gap(np.array([1.0, 2.0, 3.0]), np.array([0.5, 1.0, 2.5]))
        (0.6666666666666666, 0.16666666666666666)
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size == 0:
        raise LayershapError("no common measured window to compare two sets on")
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.inf
    return float(d.mean()), se


def drop_threshold(z: float, windows: int) -> float:
    """Standard errors behind the leader that drop a contender: the Student-t quantile (``windows - 1`` degrees of
    freedom) at the one-sided level of the normal quantile ``z``.

    Example:
        >>> round(drop_threshold(2.0, 4), 2), round(drop_threshold(2.0, 10_000), 2)
        (3.31, 2.0)
    """
    if windows < 2:
        return math.inf
    return float(student_t.ppf(normal.cdf(z), windows - 1))


def race(contenders: Sequence[Sequence[int]], blocks: Sequence[WindowLoss], n_layers: int, *,
         block_tokens: int = 0, z: float = Z_DROP) -> RaceResult:
    """Race ``contenders`` (removal sets) over ``blocks`` (module docstring); returns the :class:`RaceResult`.

    ``blocks[b](masks)`` measures per-window losses on block ``b`` (e.g. ``CachedOracle.window_loss`` of a decision
    store; stored rows are free). ``block_tokens``: predicted tokens per block pass, for the token count.

    Example:
        >>> race([(9,), (7,)], [decision.window_loss], n_layers=18, block_tokens=1024).winner  # doctest: +SKIP
    """
    sets = list(dict.fromkeys(tuple(sorted(int(i) for i in s)) for s in contenders))
    if not sets:
        raise LayershapError("a race needs at least one contender")
    if not blocks:
        raise LayershapError("a race needs at least one block of decision windows")
    rows: dict[tuple[int, ...], list[np.ndarray]] = {s: [] for s in sets}
    alive = list(sets)
    dropped: dict[tuple[int, ...], int] = {}
    passes = 0
    for b, measure in enumerate(blocks):
        if len(alive) == 1 and b > 0:
            break
        values = np.asarray(measure(masks_from_removed(alive, n_layers)), dtype=np.float64)
        passes += len(alive)
        for s, v in zip(alive, values):
            rows[s].append(v)
        joined = {s: np.concatenate(rows[s]) for s in alive}
        leader = min(alive, key=lambda s: (float(np.nanmean(joined[s])), s))
        keep = [leader]
        for s in alive:
            if s == leader:
                continue
            gap, se = paired_gap(joined[s], joined[leader])
            if gap > drop_threshold(z, int(np.isfinite(joined[s] - joined[leader]).sum())) * se:
                dropped[s] = b
            else:
                keep.append(s)
        alive = sorted(keep, key=lambda s: float(np.nanmean(joined[s])))
    loss = {s: float(np.nanmean(np.concatenate(rows[s]))) for s in sets}
    blocks_run = {s: len(rows[s]) for s in sets}
    winner = alive[0]
    others = [s for s in sets if s != winner]
    result = RaceResult(winner, loss, blocks_run, passes=passes, tokens=passes * block_tokens, dropped=dropped)
    if others:
        # the runner-up: the strongest rival over the windows it shares with the winner
        gaps = {s: paired_gap(np.concatenate(rows[s]), np.concatenate(rows[winner])[: sum(map(len, rows[s]))])
                for s in others}
        result.runner_up = min(others, key=lambda s: (gaps[s][0], s))
        result.gap, result.gap_se = gaps[result.runner_up]
    return result
