"""Sublayer peers: attention drop by input/output cosine similarity, and BlockPruner's greedy sublayer removal,
checked against computations on deep copies with zero modules."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from torch import nn

from layershap.core.errors import LayershapError
from layershap.oracle.evaluate import MaskedEvaluator
from layershap.pruning.sublayer_peers import attention_drop, attention_importance, blockpruner

N = 4


class _ZeroMLP(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


class _ZeroAttention(nn.Module):
    def forward(self, hidden_states, **kwargs):
        return torch.zeros_like(hidden_states), None


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_attention_importance_is_one_minus_cosine_of_the_attention_step(arch, one_thread):
    """Reference: each layer's input from hooks on the plain model; ``Y`` = a copy of that layer with its MLP
    zeroed, called with what the decoder loop gave the layer."""
    model = make_tiny_model(arch, N, seed=3)
    ids = torch.as_tensor(np.random.default_rng(0).integers(3, 300, (3, 10)))
    calls: list[tuple] = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw: calls.append((m, a, kw)), with_kwargs=True)
             for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    want = np.zeros(N)
    with torch.no_grad():
        for i, (layer, args, kwargs) in enumerate(calls):
            x = args[0] if args else kwargs["hidden_states"]
            attn_only = copy.deepcopy(layer)
            attn_only.mlp = _ZeroMLP()
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            y = attn_only(x, **rest)
            y = y[0] if isinstance(y, tuple) else y
            want[i] = 1 - float(torch.nn.functional.cosine_similarity(x, y, dim=-1).mean())
    got = attention_importance(model, ids, batch_size=2, progress=False)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert np.ptp(got) > 1e-3
    k = 2
    assert attention_drop(got, k) == tuple(sorted(2 * int(i) for i in np.argsort(want)[:k]))


def test_blockpruner_is_greedy_over_sublayers(one_thread):
    model = make_tiny_model("llama", N, seed=2)
    ids = torch.as_tensor(np.random.default_rng(1).integers(3, 300, (2, 10)))

    def loss(removed: list[int]) -> float:
        m = copy.deepcopy(model)
        for p in removed:
            if p % 2 == 0:
                m.model.layers[p // 2].self_attn = _ZeroAttention()
            else:
                m.model.layers[p // 2].mlp = _ZeroMLP()
        with torch.no_grad():
            return float(m(input_ids=ids, labels=ids, use_cache=False).loss)

    removed: list[int] = []
    for _ in range(3):  # greedy by hand: the sublayer whose removal keeps the loss lowest
        rest = [p for p in range(2 * N) if p not in removed]
        removed.append(min(rest, key=lambda p: loss(removed + [p])))
    res = blockpruner(MaskedEvaluator(model, ids, players="sublayers"), 2 * N, 3, progress=False)
    assert list(res.removed) == removed
    assert res.passes == (8, 15, 21)
    assert -res.values[-1] == pytest.approx(loss(removed), abs=1e-5)
    with pytest.raises(LayershapError, match="even number of players"):
        blockpruner(MaskedEvaluator(model, ids), N - 1, 1)
