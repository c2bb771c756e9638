"""How many oracle tokens a depth-pruning plan search spends, and where: sized by depth, the K range and the device.

A search has two fidelities. **Screening** passes run on the calibration windows (few tokens: cheap, noisy): the
full model and every leave-one-out set, a focused initial sample per K, then the model-guided search rounds.
**Decision** passes run on blocks of fresh windows disjoint from the calibration windows (many tokens): the best
screened sets of each K race there block by block until one is ahead by a margin the measured noise supports
(:mod:`layershap.pruning.race`). Budgets count tokens, since the two fidelities cost differently per pass:

- screening: ``n + 1`` leave-one-out passes, :data:`INITIAL_PER_K` initial sets per K (and as many of the largest
  K plus one, which the proposal model learns from), and ``search_per_k`` more per K (default: ``n``, so the
  search grows with the number of layers it chooses among);
- decisions: at most ``candidates`` sets per K, each on at most ``max_blocks`` blocks.

:func:`plan_budget` sizes all of it; given a total token budget it shrinks the search and decision shares in
proportion, and refuses one line early when even the leave-one-out and initial passes do not fit.

Example:
    >>> b = plan_budget(18, [1, 2, 3, 4, 5], device="cpu")
    >>> b.loo_passes, b.search_per_k, b.tokens() // b.screen_tokens   # passes of the calibration windows
    (19, 18, ...)
    >>> print(b.describe())
    plan budget for 18 layers, K = 1, 2, 3, 4, 5: at most 123,392 tokens — screening 151 passes of 512 tokens ...
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from layershap.core.defaults import CALIBRATION_SEQ_LEN, CALIBRATION_WINDOWS
from layershap.core.errors import LayershapError

INITIAL_PER_K = 7  # the lowest leave-one-out set and 6 focused draws (the search's first round)
# Decision blocks per device kind: (windows, tokens per window) of one block, most blocks a set races on, most sets.
DECISION = {"cpu": {"windows": 4, "seq_len": CALIBRATION_SEQ_LEN, "max_blocks": 3, "candidates": 3},
            "cuda": {"windows": 32, "seq_len": 2048, "max_blocks": 4, "candidates": 4}}
SCREEN = {"cpu": {"windows": CALIBRATION_WINDOWS, "seq_len": CALIBRATION_SEQ_LEN},
          "cuda": {"windows": 8, "seq_len": 2048}}


@dataclass(frozen=True)
class PlanBudget:
    """Passes and tokens of one plan search (module docstring). ``screen_tokens`` / ``block_tokens``: predicted
    tokens of one screening pass / one decision-block pass."""

    n_layers: int
    ks: tuple[int, ...]
    screen_tokens: int
    block_tokens: int
    loo_passes: int
    search_per_k: int
    candidates: int
    max_blocks: int

    @property
    def screen_passes(self) -> int:
        """Most screening passes: leave-one-out, then initial and search passes per K (+ the largest K's + 1)."""
        return self.loo_passes + INITIAL_PER_K + len(self.ks) * (INITIAL_PER_K + self.search_per_k)

    @property
    def decision_passes(self) -> int:
        """Most decision-block passes (every K's candidates on every block)."""
        return len(self.ks) * self.candidates * self.max_blocks

    def tokens(self) -> int:
        """Most tokens the search measures (a race that ends early spends less)."""
        return self.screen_passes * self.screen_tokens + self.decision_passes * self.block_tokens

    def to_dict(self) -> dict:
        return {**asdict(self), "ks": list(self.ks), "screen_passes": self.screen_passes,
                "decision_passes": self.decision_passes, "tokens": self.tokens()}

    def describe(self) -> str:
        """One paragraph a person reads before the search starts."""
        return (f"plan budget for {self.n_layers} layers, K = {', '.join(map(str, self.ks))}: at most "
                f"{self.tokens():,} tokens — screening {self.screen_passes} passes of {self.screen_tokens} tokens "
                f"({self.loo_passes} leave-one-out, then {INITIAL_PER_K} initial + {self.search_per_k} search per "
                f"K, {INITIAL_PER_K} initial of K = {self.ks[-1] + 1}); decisions: the best {self.candidates} sets per K race on up to {self.max_blocks} blocks of "
                f"{self.block_tokens} fresh tokens ({self.decision_passes} block passes at most)")


def minimum_screen_passes(n_layers: int, ks) -> int:
    """Leave-one-out plus the initial sets of every K: what any plan search needs before its first round."""
    return n_layers + 1 + INITIAL_PER_K * (len(ks) + 1)


def plan_budget(n_layers: int, ks, *, device: str = "cpu", screen_tokens: int | None = None,
                block_tokens: int | None = None, total_tokens: int | None = None,
                search_per_k: int | None = None, candidates: int | None = None,
                max_blocks: int | None = None) -> PlanBudget:
    """The budget of a plan search for ``ks`` on an ``n_layers``-layer model (device defaults: :data:`SCREEN`,
    :data:`DECISION`). With ``total_tokens`` the search and decision shares shrink in proportion to fit; a total
    below the leave-one-out and initial passes is a :class:`LayershapError` naming what the K range needs.

    Example:
        >>> plan_budget(80, [1, 2, 4, 8, 16, 24], total_tokens=60_000).search_per_k  # doctest: +SKIP
    """
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks:
        raise LayershapError("give at least one number of layers to remove")
    screen = screen_tokens or SCREEN[kind]["windows"] * SCREEN[kind]["seq_len"]
    dec = DECISION[kind]
    block = block_tokens or dec["windows"] * dec["seq_len"]
    budget = PlanBudget(n_layers, ks, screen, block, n_layers + 1,
                        n_layers if search_per_k is None else int(search_per_k),
                        dec["candidates"] if candidates is None else int(candidates),
                        dec["max_blocks"] if max_blocks is None else int(max_blocks))
    for name in ("search_per_k", "candidates", "max_blocks"):
        if getattr(budget, name) < (1 if name != "search_per_k" else 0):
            raise LayershapError(f"{name.replace('_', '-')} must be >= {1 if name != 'search_per_k' else 0}, "
                                 f"got {getattr(budget, name)}")
    if total_tokens is None or total_tokens >= budget.tokens():
        return budget
    floor = minimum_screen_passes(n_layers, ks) * screen + len(ks) * min(2, budget.candidates) * block
    if total_tokens < floor:
        raise LayershapError(
            f"a budget of {total_tokens:,} tokens cannot plan K = {', '.join(map(str, ks))} on {n_layers} layers: "
            f"the {n_layers + 1} leave-one-out and {INITIAL_PER_K} initial passes per K ({screen} tokens each) and "
            f"one decision block for 2 sets per K ({block} tokens each) need {floor:,}; give at least that many "
            f"tokens, or fewer K values"
        )
    # shrink the search and the decisions in proportion (at least 2 candidates on 1 block each)
    scale = (total_tokens - floor) / max(1, budget.tokens() - floor)
    search = int(budget.search_per_k * scale)
    blocks = max(1, int(budget.max_blocks * math.sqrt(scale)))
    cands = max(min(2, budget.candidates), round(budget.candidates * math.sqrt(scale)))
    shrunk = PlanBudget(n_layers, ks, screen, block, n_layers + 1, search, cands, blocks)
    while shrunk.tokens() > total_tokens and shrunk.search_per_k > 0:
        shrunk = PlanBudget(n_layers, ks, screen, block, n_layers + 1, shrunk.search_per_k - 1, cands, blocks)
    return shrunk
