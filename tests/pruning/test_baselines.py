"""Peer pruning baselines against independent re-computations with Hugging Face's own outputs and loss."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from conftest import loss_with_layers_deleted, make_tiny_model
from torch import nn

from layershap.core.errors import LayershapError
from layershap.oracle.evaluate import MaskedEvaluator
from layershap.pruning.baselines import (
    Removal,
    angular_block,
    block_influence,
    drop_last,
    hidden_state_similarity,
    leave_one_out,
    random_removal,
    run_baselines,
    sleb,
)

N = 5


def _windows(seed: int = 0, w: int = 3, length: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 300, size=(w, length))
    ids[:, 0] = 0  # a BOS id at the start of every window
    return ids


def _final_norm_path(arch: str) -> tuple[str, str]:
    return {"llama": ("model", "norm"), "gemma3": ("model", "norm"), "gpt2": ("transformer", "ln_f"),
            "opt": ("model.decoder", "final_layer_norm")}[arch]


def _reference_hidden_states(model: nn.Module, arch: str, windows: np.ndarray) -> torch.Tensor:
    """Residual stream before every layer and after the last one, via output_hidden_states=True on a copy
    whose final norm is the identity (HF returns the normed output as the last hidden state): [n+1, T, H]."""
    ref = copy.deepcopy(model)
    parent_path, attr = _final_norm_path(arch)
    parent = ref
    for part in parent_path.split("."):
        parent = getattr(parent, part)
    setattr(parent, attr, nn.Identity())
    with torch.no_grad():
        hs = ref(input_ids=torch.as_tensor(windows), output_hidden_states=True, use_cache=False).hidden_states
    return torch.stack([h.reshape(-1, h.shape[-1]) for h in hs]).double()


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "opt"])
def test_block_influence_and_angular_distance_match_hidden_states(arch):
    model = make_tiny_model(arch, N, seed=4)
    windows = _windows()
    stats = hidden_state_similarity(model, windows, batch_size=2, progress=False)
    hs = _reference_hidden_states(model, arch, windows)
    cos = torch.nn.functional.cosine_similarity(hs[:, None], hs[None, :], dim=-1)  # [n+1, n+1, T]
    expected_bi = np.array([1.0 - cos[i, i + 1].mean().item() for i in range(N)])
    np.testing.assert_allclose(block_influence(stats), expected_bi, rtol=0, atol=2e-6)
    assert stats.n_tokens == windows.size and stats.oracle_passes == 1
    for k in range(1, N):
        dist = [(torch.arccos(cos[s, s + k].clamp(-1, 1)) / torch.pi).mean().item() for s in range(N - k + 1)]
        start, d = angular_block(stats, k)
        assert start == int(np.argmin(dist))
        assert d == pytest.approx(min(dist), abs=2e-6)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_leave_one_out_matches_deleting_a_layer(arch):
    model = make_tiny_model(arch, N, seed=5)
    windows = _windows(1)
    scores, passes = leave_one_out(MaskedEvaluator(model, windows, batch_size=2), N)
    full = loss_with_layers_deleted(model, windows)
    expected = np.array([loss_with_layers_deleted(model, windows, i) - full for i in range(N)])
    np.testing.assert_allclose(scores, expected, rtol=0, atol=2e-5)
    assert passes == N + 1


def _game(costs: np.ndarray, pair_bonus: dict[tuple[int, int], float]):
    """v(mask) = -(sum of removed costs) + bonus for every removed pair listed (a known, checkable game)."""
    def v(masks: np.ndarray) -> np.ndarray:
        masks = np.asarray(masks, bool)
        out = -((~masks) * costs).sum(1)
        for (a, b), bonus in pair_bonus.items():
            out = out + bonus * (~masks[:, a] & ~masks[:, b])
        return out
    return v


def _best_by_enumeration(v, n: int, k: int) -> tuple[int, ...]:
    best, best_val = None, -np.inf
    for combo in itertools.combinations(range(n), k):
        mask = np.ones((1, n), bool)
        mask[0, list(combo)] = False
        val = v(mask)[0]
        if val > best_val:
            best, best_val = combo, val
    return best


def test_sleb_finds_known_optimum_of_additive_game_and_counts_passes():
    costs = np.array([5.0, 0.3, 4.0, 0.1, 2.0, 0.2, 3.0])
    v = _game(costs, {})
    res = sleb(v, 7, 4, progress=False)
    assert res.removed == (3, 5, 1, 4)  # cheapest first
    for k in range(1, 5):
        assert res.removal(k) == _best_by_enumeration(v, 7, k)
        assert res.values[k - 1] == pytest.approx(-np.sort(costs)[:k].sum())
    assert res.passes == (7, 13, 18, 22)


def test_sleb_is_greedy_on_a_game_with_interactions():
    # removing 0 alone is cheapest, but {1, 2} together is cheaper than any pair containing 0
    v = _game(np.array([1.0, 2.0, 2.0, 3.0]), {(1, 2): 3.5})
    res = sleb(v, 4, 2, progress=False)
    assert res.removed == (0, 1)  # greedy path: 0 first, then the cheapest partner (tie 1/2 -> lower index)
    assert _best_by_enumeration(v, 4, 2) == (1, 2)  # the true optimum greedy misses


def test_drop_last_random_and_bad_k():
    assert drop_last(6, 2) == (4, 5)
    a = random_removal(10, 3, seed=0)
    assert a == random_removal(10, 3, seed=0) and len(set(a)) == 3 and all(0 <= i < 10 for i in a)
    draws = {random_removal(10, 3, seed=s) for s in range(5)}
    assert len(draws) > 1
    with pytest.raises(LayershapError, match="choose 1 <= K"):
        drop_last(4, 4)
    assert list(Removal("x", 2, (0, 3), 0).mask(4)) == [False, True, True, False]


def test_run_baselines_on_tiny_model():
    model = make_tiny_model("llama", N, seed=6)
    windows = _windows(2)
    ev = MaskedEvaluator(model, windows, batch_size=2)
    calls = []

    def counting(masks):
        calls.append(len(masks))
        return ev(masks)

    out = run_baselines(model, counting, windows, ks=[1, 2], seeds=(0, 1), progress=False)
    by = {(r.method, r.k, r.seed): r for r in out}
    assert sum(calls) == (N + 1) + N + (N - 1)  # LOO, then SLEB's two greedy steps
    assert by[("leave-one-out", 1, None)].oracle_passes == N + 1
    assert [by[("SLEB", k, None)].oracle_passes for k in (1, 2)] == [N, 2 * N - 1]
    assert by[("block influence", 2, None)].oracle_passes == 1
    assert by[("drop-last", 2, None)].removed == (3, 4) and by[("drop-last", 2, None)].oracle_passes == 0
    # SLEB's first removal is the layer with the smallest leave-one-out NLL increase, recomputed with HF loss
    full = loss_with_layers_deleted(model, windows)
    loo = [loss_with_layers_deleted(model, windows, i) - full for i in range(N)]
    assert by[("SLEB", 1, None)].removed == (int(np.argmin(loo)),)
    assert by[("leave-one-out", 2, None)].removed == tuple(sorted(np.argsort(loo)[:2]))
    # SLEB at k=2: the best partner of its first choice, by HF loss on a copy with both layers deleted
    first = by[("SLEB", 1, None)].removed[0]
    partners = [j for j in range(N) if j != first]
    best = partners[int(np.argmin([loss_with_layers_deleted(model, windows, (first, j)) for j in partners]))]
    assert by[("SLEB", 2, None)].removed == tuple(sorted((first, best)))
    assert {r.seed for r in out if r.method == "random"} == {0, 1}
