"""Distillation healing: LoRA on the layers next to each removed span, trained on KL to the dense model and
merged: the KL drops, only the bordering layers change, and the saved model is a standard one that reloads equal."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model, make_tiny_tokenizer
from transformers import AutoModelForCausalLM

from layershap.core.masks import masks_from_removed
from layershap.oracle.layers import find_layers
from layershap.oracle.prune import prune_model
from layershap.pruning.distill import bordering_layers, distill, save_distilled_model


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _windows() -> torch.Tensor:
    return torch.randint(3, 300, (8, 24), generator=torch.Generator().manual_seed(0))


def test_bordering_layers_are_the_kept_neighbours_renumbered():
    assert bordering_layers([6, 7, 8, 9], 18) == [5, 6]
    assert bordering_layers([0, 1], 4) == [0]
    assert bordering_layers([2, 3], 4) == [1]
    assert bordering_layers([1, 4], 6) == [0, 1, 2, 3]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_distill_lowers_kl_and_changes_only_the_bordering_layers(arch, tmp_path):
    dense = make_tiny_model(arch, n_layers=6, seed=1)
    before = copy.deepcopy(dense.state_dict())
    win = _windows()
    student, record = distill(dense, win, [2, 3], steps=30, lr=1e-2, progress=False)
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())  # the teacher is untouched
    assert type(student) is type(dense) and not any("lora" in k for k in student.state_dict())
    with torch.no_grad():  # the recorded KL, recomputed here with torch's own kl_div
        t = torch.log_softmax(dense(input_ids=win).logits, -1)
        s = torch.log_softmax(student(input_ids=win).logits, -1)
        kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1).mean().item()
    assert record["kl_after"] == pytest.approx(kl, rel=1e-4)
    assert record["kl_after"] < 0.7 * record["kl_before"]
    pruned = prune_model(copy.deepcopy(dense), masks_from_removed([2, 3], 6)[0])
    old, new = find_layers(pruned).layers, find_layers(student).layers
    changed = [i for i in range(4) if any(not torch.equal(a, b) for a, b in
                                          zip(old[i].state_dict().values(), new[i].state_dict().values()))]
    assert changed == [1, 2] == record["adapted_layers"]  # original layers 1 and 4
    assert torch.equal(pruned.get_input_embeddings().weight, student.get_input_embeddings().weight)

    out = save_distilled_model(student, make_tiny_tokenizer(), record, [2, 3], 6, tmp_path / "d")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = win[:2, :12]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, student(input_ids=ids).logits, rtol=0, atol=1e-5)
        kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 2}
        assert torch.equal(reloaded.generate(ids[:1], use_cache=True, **kw),
                           reloaded.generate(ids[:1], use_cache=False, **kw))
    assert np.array_equal(reloaded.config.num_hidden_layers, 4)
