"""Fast oracle path (prefix sharing, tiled loss) against plain Hugging Face forwards with ``labels=``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHS, TINY_VOCAB, loss_with_layers_deleted, make_tiny_model

from layershap.core.errors import LayershapError
from layershap.oracle.evaluate import MaskedEvaluator
from layershap.oracle.head_loss import tiled_token_nll
from layershap.oracle.prefix import plan_prefix_runs, trie_order

N_LAYERS = 5


pytestmark = pytest.mark.usefixtures("one_thread")


def _windows(seed: int = 1, n: int = 3, length: int = 17) -> torch.Tensor:
    return torch.randint(3, TINY_VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _masks(n: int = N_LAYERS, seed: int = 0) -> np.ndarray:
    """Full, empty, random (with a repeat), and masks that share no prefix with each other."""
    rng = np.random.default_rng(seed)
    rand = rng.random((6, n)) < 0.6
    rand[5] = rand[2]  # a repeated mask
    no_shared = np.array([[i == j for j in range(n)] for i in range(n)])  # first kept layer differs everywhere
    return np.vstack([np.ones((1, n), bool), np.zeros((1, n), bool), rand, no_shared, ~no_shared])


def _trie_nodes(masks: np.ndarray) -> int:
    """Distinct non-empty kept-layer prefixes: the layer forwards a perfect prefix cache needs."""
    nodes = set()
    for row in masks:
        seq = tuple(np.flatnonzero(row))
        nodes.update(seq[:j] for j in range(1, len(seq) + 1))
    return len(nodes)


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_paths_equal_plain_hf_loss(arch):
    model = make_tiny_model(arch, N_LAYERS, seed=0)
    windows = _windows()
    masks = _masks()
    reference = np.array([loss_with_layers_deleted(model, windows, np.flatnonzero(~m)) for m in masks])
    assert np.ptp(reference) > 0.1  # the masks really change the loss
    options = [
        {},  # prefix sharing, tiled loss, default chunks
        {"prefix_sharing": False},
        {"token_chunk": 13, "vocab_chunk": 100, "batch_size": 2},  # ragged tiles and window batches
        {"token_chunk": 70, "vocab_chunk": 90, "batch_size": 2},  # two masks per head pass, ragged vocab chunks
        {"token_chunk": 4, "vocab_chunk": None},  # generic token-chunk path through the head module
        {"cache_mb": 0},
    ]
    results = {}
    for opts in options:
        ev = MaskedEvaluator(model, windows, **opts)
        results[str(opts)] = ev.nll(masks)
        np.testing.assert_allclose(results[str(opts)], reference, rtol=0, atol=2e-5, err_msg=f"{arch} {opts}")
    # prefix sharing vs one skip_layers forward per mask, same loss code: equal to float rounding
    np.testing.assert_allclose(results["{}"], results[str({"prefix_sharing": False})], rtol=1e-7, atol=0)
    assert results["{}"][1] == pytest.approx(reference[1], abs=2e-5)  # all-False mask: embeddings -> norm -> head


@pytest.mark.parametrize("arch", ["gemma3", "gpt2", "opt"])
def test_tiny_cache_budget_is_respected_and_exact(arch):
    model = make_tiny_model(arch, N_LAYERS, seed=2)
    windows = _windows(seed=3)
    masks = _masks(seed=4)
    reference = np.array([loss_with_layers_deleted(model, windows, np.flatnonzero(~m)) for m in masks])
    slot = MaskedEvaluator(model, windows).slot_bytes
    assert slot == 3 * 17 * 32 * 4  # windows x tokens x hidden x float32
    for slots in (1, 2):
        budget_mb = slots * slot / 2**20
        ev = MaskedEvaluator(model, windows, cache_mb=budget_mb)
        values = ev.nll(masks)
        np.testing.assert_allclose(values, reference, rtol=0, atol=2e-5)
        assert 0 < ev.last_stats["peak_cache_bytes"] <= slots * slot
        assert ev.last_stats["layer_runs"] < ev.last_stats["plain_layer_runs"]
    ev = MaskedEvaluator(model, windows, cache_mb=0.5 * slot / 2**20)  # less than one slot: no caching
    np.testing.assert_allclose(ev.nll(masks), reference, rtol=0, atol=2e-5)
    assert ev.last_stats["peak_cache_bytes"] == 0
    assert ev.last_stats["layer_runs"] == int(np.unique(masks, axis=0).sum())


def test_results_do_not_depend_on_mask_order():
    model = make_tiny_model("gemma2", N_LAYERS, seed=5)
    windows = _windows(seed=6)
    masks = np.random.default_rng(7).random((16, N_LAYERS)) < 0.5
    ev = MaskedEvaluator(model, windows)
    first = ev.nll(masks)
    perm = np.random.default_rng(8).permutation(len(masks))
    np.testing.assert_allclose(ev.nll(masks[perm]), first[perm], rtol=1e-9, atol=0)
    singles = np.array([ev.nll(m)[0] for m in masks[:4]])  # one mask per call: no sharing at all
    np.testing.assert_allclose(singles, first[:4], rtol=1e-7, atol=0)


def test_full_logits_are_never_materialised(monkeypatch):
    model = make_tiny_model("llama", 3, seed=0)
    windows = _windows()
    reference = np.array([loss_with_layers_deleted(model, windows)])
    shapes = []
    original = F.linear

    def recording_linear(x, w, b=None):
        out = original(x, w, b)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch.nn.functional, "linear", recording_linear)
    ev = MaskedEvaluator(model, windows, vocab_chunk=64, token_chunk=16)
    np.testing.assert_allclose(ev.nll(np.ones((1, 3), bool)), reference, atol=2e-5)
    assert shapes and max(s[-1] for s in shapes) < TINY_VOCAB  # no output has the vocabulary as last dim
    assert max(int(np.prod(s[:-1])) for s in shapes if s[-1] <= 64) <= 3 * 17  # head tiles <= 16 x 64 logits
    assert any(s == (16, 64) for s in shapes)


@pytest.mark.parametrize("softcap, bias", [(None, False), (5.0, True)])
def test_tiled_loss_equals_cross_entropy(softcap, bias):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(101, 12, generator=gen)
    b = torch.randn(101, generator=gen) if bias else None
    hidden = torch.randn(37, 12, generator=gen) * 3
    targets = torch.randint(0, 101, (37,), generator=gen)
    logits = F.linear(hidden, weight, b).double()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    expected = F.cross_entropy(logits, targets, reduction="sum").item()
    for tc, vc in [(37, 101), (5, 7), (1, 100), (8, 1)]:
        got = tiled_token_nll(weight, b, hidden, targets, softcap, tc, vc).sum(dtype=torch.float64).item()
        assert got == pytest.approx(expected, rel=2e-6), (tc, vc)


def test_plan_counts_each_trie_node_once_and_stays_within_slots():
    masks = np.random.default_rng(3).random((40, 8)) < 0.7
    masks[:3] = [np.ones(8, bool), np.zeros(8, bool), ~masks[3]]
    unique = np.unique(masks, axis=0)
    unlimited = plan_prefix_runs(masks, max_slots=10_000)
    assert unlimited.layer_runs == _trie_nodes(unique)
    assert plan_prefix_runs(masks, max_slots=0).layer_runs == int(unique.sum())
    assert (unlimited.unique[unlimited.inverse] == masks).all()
    previous = None
    for slots in (1, 2, 3, 5):
        plan = plan_prefix_runs(masks, max_slots=slots)
        assert _trie_nodes(unique) <= plan.layer_runs <= int(unique.sum())
        if previous is not None:
            assert plan.layer_runs <= previous + 0  # more slots never cost more layer forwards here
        previous = plan.layer_runs
        cached: set[int] = set()
        for step in plan.steps:  # replay the plan: every start is cached, the count never exceeds the slots
            cached -= set(step.evict)
            assert step.start == 0 or step.start in cached
            seq = tuple(np.flatnonzero(plan.unique[step.row]))
            assert step.layers == seq[step.start:]
            cached |= set(step.capture)
            assert len(cached) <= slots
    assert sorted(s.row for s in unlimited.steps) == list(range(len(unique)))


def test_plan_example_shares_the_common_prefix():
    plan = plan_prefix_runs(np.array([[1, 1, 1], [1, 1, 0], [0, 1, 1]], bool), max_slots=4)
    assert [(s.start, s.layers, s.capture) for s in plan.steps] == [
        (0, (0, 1), (2,)), (2, (2,), ()), (0, (1, 2), ()),
    ]
    with pytest.raises(ValueError, match="max_slots"):
        plan_prefix_runs(np.ones((1, 3), bool), max_slots=-1)


def test_trie_order_groups_shared_prefixes():
    masks = np.array([[0, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 1]], bool)
    # kept sequences (1, 2), (0, 1), (0, 1, 2), (0, 2): lexicographic -> (0, 1), (0, 1, 2), (0, 2), (1, 2)
    assert trie_order(masks).tolist() == [1, 2, 3, 0]


def test_bad_options_are_clear_errors():
    model = make_tiny_model("llama", 2, seed=0)
    windows = _windows()
    for kwargs, match in [({"cache_mb": -1}, "cache_mb"), ({"vocab_chunk": 0}, "vocab_chunk"),
                          ({"batch_size": 0}, "batch size")]:
        with pytest.raises(LayershapError, match=match):
            MaskedEvaluator(model, windows, **kwargs)
    with pytest.raises(LayershapError, match="windows"):
        MaskedEvaluator(model, windows[:, :1])


def test_non_finite_loss_is_a_clear_user_error():
    """A mask whose forward diverges raises NonFiniteLossError (a LayershapError the CLI prints cleanly)."""
    import numpy as np
    import pytest
    import torch

    from layershap.core.errors import LayershapError, NonFiniteLossError
    from layershap.oracle.evaluate import MaskedEvaluator

    model = make_tiny_model("llama", 3, seed=0)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    ev = MaskedEvaluator(model, torch.randint(0, 300, (1, 12)))
    ok = ev.nll(np.array([[1, 0, 1]], bool))            # layer 1 skipped: finite
    assert np.isfinite(ok).all()
    with pytest.raises(NonFiniteLossError) as info:
        ev.nll(np.array([[1, 1, 1]], bool))
    assert isinstance(info.value, LayershapError) and "rows [0]" in str(info.value)


def test_layer_stand_ins_answer_the_attributes_decoder_loops_read():
    """transformers 4.5x loops read ``decoder_layer.attention_type`` from every list entry; the prefix runner's
    stand-ins answer every attribute of the layer they stand for (and hold no second copy of its weights)."""
    from layershap.oracle.prefix import _Capture, _Replay

    model = make_tiny_model("gemma3", 2, seed=0)
    layer = model.model.layers[1]
    layer.attention_type = "full_attention"  # what transformers 4.5x sets on each decoder layer
    capture = _Capture(layer, [])
    replay = _Replay(torch.zeros(1, 3, 32), 0, layer)
    for stand_in in (capture, replay):
        assert stand_in.attention_type == "full_attention"
        assert stand_in.self_attn is layer.self_attn
    assert replay.state_dict() == {} and len(capture.state_dict()) == len(layer.state_dict())
    with pytest.raises(AttributeError):
        _ = replay.no_such_attribute
