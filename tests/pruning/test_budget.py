"""Plan budgets: sized by depth and K range, shrunk to a token total, refused one line early when too small."""

from __future__ import annotations

import pytest

from layershap.core.errors import LayershapError
from layershap.pruning.budget import INITIAL_PER_K, minimum_screen_passes, plan_budget


def test_the_budget_grows_with_depth_and_counts_tokens_of_both_fidelities():
    small, deep = plan_budget(18, [1, 2, 3, 4, 5]), plan_budget(80, [1, 2, 3, 4, 5])
    assert (small.loo_passes, deep.loo_passes) == (19, 81)
    assert deep.search_per_k > small.search_per_k
    b = small
    assert b.screen_passes == 19 + INITIAL_PER_K + 5 * (INITIAL_PER_K + b.search_per_k)
    assert b.tokens() == b.screen_passes * b.screen_tokens + 5 * b.candidates * b.max_blocks * b.block_tokens
    assert "at most" in b.describe() and f"{b.tokens():,}" in b.describe()


def test_a_total_shrinks_the_search_and_decisions_to_fit():
    full = plan_budget(32, [1, 2, 4, 8])
    shrunk = plan_budget(32, [1, 2, 4, 8], total_tokens=full.tokens() // 2)
    assert shrunk.tokens() <= full.tokens() // 2 and shrunk.loo_passes == 33
    assert shrunk.search_per_k < full.search_per_k
    assert plan_budget(32, [1, 2, 4, 8], total_tokens=10 * full.tokens()) == full  # more than needed: the default


def test_a_budget_below_what_the_k_range_needs_is_one_clear_line_naming_the_need():
    need = minimum_screen_passes(80, [1, 2, 3]) * 512
    with pytest.raises(LayershapError, match=r"cannot plan K = 1, 2, 3 on 80 layers.*81 leave-one-out") as err:
        plan_budget(80, [1, 2, 3], total_tokens=need - 1)
    assert "\n" not in str(err.value)
