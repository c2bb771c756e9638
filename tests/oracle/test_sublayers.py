"""The sublayer game: a mask entry per attention and per MLP; skipped sublayers add nothing to the residual."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from torch import nn

from layershap.core.errors import LayershapError, MaskError, UnsupportedModelError
from layershap.oracle.evaluate import MaskedEvaluator
from layershap.oracle.sublayers import blocks_to_sublayers, player_names, split_mask, unit_masks

SUBLAYER_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]
N = 4


class _ZeroAttention(nn.Module):
    """An attention returning zeros (and no weights), as HF attention modules return ``(output, weights)``."""

    def forward(self, hidden_states, **kwargs):
        return torch.zeros_like(hidden_states), None


class _ZeroMLP(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def _zeroed(model: nn.Module, mask: np.ndarray) -> nn.Module:
    """A deep copy whose skipped attentions / MLPs are modules returning zeros (a Gemma post-norm of zeros is
    zero, so the whole branch adds nothing)."""
    m = copy.deepcopy(model)
    for i, layer in enumerate(m.model.layers):
        if not mask[2 * i]:
            layer.self_attn = _ZeroAttention()
        if not mask[2 * i + 1]:
            layer.mlp = _ZeroMLP()
    return m


def reference_loss(model: nn.Module, ids: torch.Tensor, mask: np.ndarray) -> float:
    """HF's own ``labels=`` loss of :func:`_zeroed`."""
    with torch.no_grad():
        return float(_zeroed(model, mask)(input_ids=ids, labels=ids, use_cache=False).loss)


def reference_logits(model: nn.Module, ids: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    """HF's own logits of :func:`_zeroed`."""
    with torch.no_grad():
        return _zeroed(model, mask)(input_ids=ids, use_cache=False).logits


def test_masks_of_sublayers():
    assert player_names(2) == ["0.attn", "0.mlp", "1.attn", "1.mlp"]
    mask = np.array([[1, 0, 0, 1, 1, 1, 0, 0]], bool)
    attn, mlp = split_mask(mask)
    assert attn.tolist() == [[True, False, True, False]] and mlp.tolist() == [[False, True, True, False]]
    assert unit_masks(mask).astype(int).tolist() == [[0, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0]]
    assert (blocks_to_sublayers(np.array([[True, False]])) == np.array([[1, 1, 0, 0]], bool)).all()


def _masks(rng: np.random.Generator) -> np.ndarray:
    fixed = [np.ones(2 * N), np.zeros(2 * N), np.tile([0, 1], N), np.tile([1, 0], N),
             [1, 1, 0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1, 0, 1], [1, 1, 1, 1, 1, 0, 1, 1]]
    return np.vstack([np.array(fixed, bool), rng.random((5, 2 * N)) < 0.6])


@pytest.mark.parametrize("arch", SUBLAYER_ARCHS)
def test_masked_loss_equals_model_with_zeroed_sublayers(arch, one_thread):
    """Every mask, with and without prefix sharing, equals HF's loss of a copy whose skipped sublayers are zero
    modules; Gemma's sliding layers keep their own window (windows longer than it)."""
    model = make_tiny_model(arch, N, seed=1)
    ids = torch.as_tensor(np.random.default_rng(0).integers(3, 300, (3, 12)))
    masks = _masks(np.random.default_rng(1))
    want = np.array([reference_loss(model, ids, m) for m in masks])
    assert np.ptp(want) > 0.05  # the masks really differ
    assert abs(want[4] - want[5]) > 1e-3 and abs(want[2] - want[3]) > 1e-3
    for sharing in (True, False):
        ev = MaskedEvaluator(model, ids, batch_size=2, players="sublayers", prefix_sharing=sharing)
        assert (ev.n_layers, ev.n_blocks) == (2 * N, N)
        got = ev.nll(masks)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    blocks = MaskedEvaluator(model, ids, batch_size=2).nll(np.array([[1, 0, 1, 1]], bool))
    np.testing.assert_allclose(ev.nll(blocks_to_sublayers([[1, 0, 1, 1]])), blocks, rtol=0, atol=2e-5)


def test_prefix_sharing_saves_layer_runs(one_thread):
    """Sublayer masks that share their first units share those forwards."""
    model = make_tiny_model("llama", N, seed=1)
    ids = torch.as_tensor(np.random.default_rng(0).integers(3, 300, (2, 8)))
    masks = np.array([[1, 1, 1, 0, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1, 0, 1], [1, 1, 1, 0, 0, 1, 1, 1]], bool)
    ev = MaskedEvaluator(model, ids, players="sublayers")
    ev.nll(masks)
    assert ev.last_stats["plain_layer_runs"] == 12
    # units (0, 4, 6, 9), (0, 4, 6, 11), (0, 4, 8, 9): the first runs 4, the second 1 (from depth 3), the last 2
    assert ev.last_stats["layer_runs"] == 4 + 1 + 2


def test_bad_sublayer_input_is_one_line(one_thread):
    ids = torch.as_tensor(np.random.default_rng(0).integers(3, 300, (1, 8)))
    ev = MaskedEvaluator(make_tiny_model("llama", N), ids, players="sublayers")
    with pytest.raises(MaskError, match="mask length 4"):
        ev.nll(np.ones((1, N), bool))
    with pytest.raises(LayershapError, match="unknown players"):
        MaskedEvaluator(make_tiny_model("llama", N), ids, players="heads")
    with pytest.raises(UnsupportedModelError, match="--players sublayers supports"):
        MaskedEvaluator(make_tiny_model("gpt2", N), ids, players="sublayers")


def test_a_sublayer_store_records_its_players_and_refuses_block_masks(tmp_path):
    """The store of the sublayer game names its 2n players, hashes them, and refuses masks of the blocks game's
    width in one line naming the game; a blocks store's identity has no players key."""
    from layershap.oracle.store import DatasetStore
    from layershap.oracle.text import windows_sha256

    windows = np.random.default_rng(0).integers(0, 300, size=(2, 9), dtype=np.int64)
    base = {"model_id": "tiny", "model_hash": "a" * 64, "text_id": "builtin", "windows_sha256": windows_sha256(windows),
            "n_windows": 2, "seq_len": 8, "dtype": "float32"}
    sub = dict(base, n_layers=2 * N, layer_types=["full_attention", "mlp"] * N, game="sublayers",
               players=player_names(N))
    with DatasetStore.create_or_open(tmp_path / "s.zarr", sub, windows) as store:
        store.append(np.ones((1, 2 * N), bool), np.array([2.0]), np.array([0.1]))
        assert store.players == player_names(N) and store.game == "sublayers"
        assert store.identity["players"] == player_names(N)
        with pytest.raises(MaskError, match=f"holds the sublayers game: masks of {2 * N} entries .attention and MLP "
                                            f"of each of {N} layers., not {N}"):
            store.missing(np.ones((1, N), bool))
        hashed = store.content_hash()
    renamed = dict(sub, players=[f"p{i}" for i in range(2 * N)])
    with DatasetStore.create_or_open(tmp_path / "r.zarr", renamed, windows) as other:
        other.append(np.ones((1, 2 * N), bool), np.array([2.0]), np.array([0.1]))
        assert other.content_hash() != hashed  # the player list is part of what the rows mean
    blocks = dict(base, n_layers=N, layer_types=["full_attention"] * N)
    with DatasetStore.create_or_open(tmp_path / "b.zarr", blocks, windows) as store:
        assert "players" not in store.identity and "players" not in store.attrs
        assert store.players == ["0", "1", "2", "3"]
        with pytest.raises(MaskError, match="holds the blocks game: masks of 4 entries .one per decoder layer., not 8"):
            store.append(np.ones((1, 2 * N), bool), np.array([2.0]), np.array([0.1]))


def test_sublayer_costs_of_a_gemma_layer():
    """Attention: q, k, v, o, the q/k norms and both branch norms; MLP: gate, up, down and its two norms; the KV
    cache holds a key and a value per kv head; counted from the config."""
    from layershap.oracle.sublayers import removed_costs, sublayer_costs

    model = make_tiny_model("gemma3", N)
    c = model.config
    linear_attn = 2 * c.hidden_size * c.num_attention_heads * c.head_dim + 2 * c.hidden_size * (
        c.num_key_value_heads * c.head_dim)
    attn = linear_attn + 2 * c.head_dim + 2 * c.hidden_size
    linear_mlp = 3 * c.hidden_size * c.intermediate_size
    mlp = linear_mlp + 2 * c.hidden_size
    costs = sublayer_costs(model)
    assert costs["parameters"].tolist() == [attn, mlp] * N
    assert costs["parameters"].sum() == sum(p.numel() for p in model.model.layers.parameters())
    assert costs["flops_per_token"].tolist() == [2 * linear_attn, 2 * linear_mlp] * N
    assert costs["kv_cache_bytes_per_token"].tolist() == [2 * c.num_key_value_heads * c.head_dim * 4, 0] * N
    removed = removed_costs(costs, [0, 2, 5])
    assert removed["parameters"] == 2 * attn + mlp
    assert removed["parameter_share"] == pytest.approx((2 * attn + mlp) / (N * (attn + mlp)))
    assert removed["kv_cache_share"] == pytest.approx(2 / N)


def test_kl_utility_on_sublayer_masks(one_thread):
    """KL(dense || masked) of sublayer masks: 0 for the full mask, else the divergence computed from the logits
    of the zero-module copy (the tiny vocabulary is below top-k, so the stored KL is exact)."""
    model = make_tiny_model("qwen3", N, seed=2)
    ids = torch.as_tensor(np.random.default_rng(4).integers(3, 300, (2, 10)))
    masks = np.array([np.ones(2 * N), [1, 1, 0, 1, 1, 0, 1, 1]], bool)
    got = MaskedEvaluator(model, ids, players="sublayers", utility="kl").loss(masks)
    with torch.no_grad():
        dense = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].double(), -1)
    masked = torch.log_softmax(reference_logits(model, ids, masks[1])[:, :-1].double(), -1)
    want = float((dense.exp() * (dense - masked)).sum(-1).mean())
    assert got[0] == pytest.approx(0.0, abs=1e-9)
    assert got[1] == pytest.approx(want, rel=1e-4) and want > 1e-3
