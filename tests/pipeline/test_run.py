"""`layershap run` end to end: tiny random model (seconds) and the embedded Gemma-3-270M in a reduced setting."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import loss_with_layers_deleted, save_tiny_model_dir

from layershap.cli.main import main
from layershap.oracle.store import DatasetStore


def test_run_tiny_model_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = save_tiny_model_dir(tmp_path / "tiny", "llama", 6, seed=1)
    out = tmp_path / "run"
    argv = ["run", "--model", str(model_dir), "--out", str(out), "--n-masks", "30", "--windows", "2",
            "--seq-len", "24", "--members", "2", "--hidden", "32", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for name in ("dataset.zarr", "surrogate/metadata.json", "scores.json", "scores.png", "summary.json"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    scores = json.loads((out / "scores.json").read_text())
    store = DatasetStore.open(out / "dataset.zarr")
    assert len(store) >= 30
    windows = store.windows

    # the table's leave-one-out perplexities are the oracle's, checked against HF's loss on a deleted-layer model
    row = summary["layers"][2]
    assert row["loo_perplexity"] == pytest.approx(math.exp(loss_with_layers_deleted(model_dir, windows, [2])), rel=1e-5)
    assert summary["full_perplexity"] == pytest.approx(math.exp(loss_with_layers_deleted(model_dir, windows, [])), rel=1e-5)
    # ranks follow the scores (rank 1 = lowest score)
    order = np.argsort([r["score"] for r in summary["layers"]], kind="stable")
    assert [summary["layers"][i]["rank"] for i in order] == list(range(1, 7))
    assert scores["ranking"] == [int(i) for i in order]
    # each suggestion's measured perplexity is the real perplexity of the model without those layers
    for s in summary["suggestions"]:
        assert len(s["layers"]) == s["remove"]
        assert s["measured_perplexity"] == pytest.approx(
            math.exp(loss_with_layers_deleted(model_dir, windows, s["layers"])), rel=1e-5)
    assert "verified plans" in printed and "LOO ppl" in printed
    # every plan was measured: calibration and decision perplexities are the real ones on their windows, and the
    # decision blocks share no window with the calibration windows or each other
    blocks = [DatasetStore.open(out / f"decision-{b}.zarr").windows for b in range(3)]
    seen = {w.tobytes() for w in windows}
    for block in blocks:
        assert not {w.tobytes() for w in block} & seen
        seen |= {w.tobytes() for w in block}
    for p in summary["plans"]:
        assert p["perplexity"] == pytest.approx(math.exp(loss_with_layers_deleted(model_dir, windows, p["removed"])),
                                                rel=1e-5)
        ran = [loss_with_layers_deleted(model_dir, blocks[b], p["removed"]) for b in range(p["decision_blocks"])]
        assert p["decision_perplexity"] == pytest.approx(math.exp(np.mean(ran)), rel=1e-5)
        assert p["separated"] == (p["margin_se"] is None or p["margin_se"] >= 2.0)
    assert [p["k"] for p in summary["plans"]] == [1, 2]  # 1 .. 30 % of 6 layers
    # the surrogate is registered (the test's private registry)
    assert main(["registry", "list"]) == 0 and "tiny" in capsys.readouterr().out

    # running again resumes: nothing is re-measured, finished rows keep their values, and the plan budget counts
    # over the run's life (plans.json records what each K spent), so a finished run adds no row and chooses the
    # same plans
    before = {m.tobytes(): (v, s) for m, v, s in zip(store.masks, store.nll, store.seconds)}
    assert main(argv) == 0
    again = DatasetStore.open(out / "dataset.zarr")
    rows = {m.tobytes(): (v, s) for m, v, s in zip(again.masks, again.nll, again.seconds)}
    assert rows == before
    assert json.loads((out / "summary.json").read_text())["plans"] == summary["plans"]


@pytest.mark.slow
def test_run_embedded_gemma_reduced(tmp_path, capsys):
    """The real embedded model, few masks and short windows: layer 5 must come out as the most important."""
    out = tmp_path / "gemma"
    argv = ["run", "--out", str(out), "--n-masks", "40", "--windows", "1", "--seq-len", "48",
            "--members", "1", "--hidden", "64", "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_layers"] == 18
    assert 1 < summary["full_perplexity"] < 200
    loo = [r["loo_perplexity"] for r in summary["layers"]]
    assert int(np.argmax(loo)) == 5 and loo[5] > 100 * summary["full_perplexity"]
    ranks = {r["layer"]: r["rank"] for r in summary["layers"]}
    assert ranks[5] >= 16  # among the three most important layers
    for s in summary["suggestions"]:
        assert 5 not in s["layers"]
        assert math.isfinite(s["measured_perplexity"])


def test_run_with_active_sampling_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = save_tiny_model_dir(tmp_path / "tiny", "llama", 5, seed=2)
    out = tmp_path / "run"
    argv = ["run", "--model", str(model_dir), "--out", str(out), "--n-masks", "14", "--active-rows", "24",
            "--windows", "1", "--seq-len", "16", "--members", "2", "--hidden", "16", "--no-progress"]
    assert main(argv) == 0
    report = json.loads((out / "active_sampling.json").read_text())
    store = DatasetStore.open(out / "dataset.zarr")
    keys = [m.tobytes() for m in store.masks]
    assert len(keys) == len(set(keys))                      # no mask measured twice
    assert report["stopped"] in ("stable", "budget", "exhausted")
    plans = json.loads((out / "plans.json").read_text())
    # active rows are not plan passes: the plan stage still searched (it spent 0 passes before this fix)
    assert plans["passes"] > 0 and len(store) == report["rows"] + plans["passes"]
    # a rerun asking for a new K measures that K's sets; the K planned before spend nothing more
    before = len(store)
    assert main(argv + ["--remove", "1,2,3"]) == 0
    again = json.loads((out / "plans.json").read_text())
    grown = DatasetStore.open(out / "dataset.zarr")
    new_sets = {int((~m).sum()) for m in grown.masks[before:]}
    assert again["passes"] > 0 and new_sets and new_sets <= {3, 4}
    assert again["spent"]["2"] == plans["spent"]["2"]


def test_run_with_the_kl_utility_end_to_end(tmp_path, capsys, monkeypatch):
    """``run --utility kl``: the store's loss is the KL to the dense model (0 for the full model, the exact
    divergence of a deleted-layer copy on the calibration windows for the plans), the surrogate learns it and says
    so, the scores are of -kl, and the plans still report real perplexities."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from layershap.surrogate.checkpoint import load_surrogate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = save_tiny_model_dir(tmp_path / "tiny", "llama", 6, seed=2)
    out = tmp_path / "run"
    argv = ["run", "--model", str(model_dir), "--out", str(out), "--n-masks", "30", "--windows", "2",
            "--seq-len", "24", "--members", "2", "--hidden", "32", "--no-progress", "--utility", "kl"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    store = DatasetStore.open(out / "dataset.zarr")
    assert store.utility == "kl" and "of -kl" in printed
    assert load_surrogate(out / "surrogate").utility == "kl"
    summary = json.loads((out / "summary.json").read_text())
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.as_tensor(store.windows)
    with torch.no_grad():
        ref = torch.log_softmax(dense(input_ids=ids, use_cache=False).logits[:, :-1].double(), -1)

    def kl_deleted(removed: list[int]) -> float:
        m = copy.deepcopy(dense)
        m.model.layers = torch.nn.ModuleList([x for i, x in enumerate(m.model.layers) if i not in removed])
        m.config.num_hidden_layers = len(m.model.layers)
        with torch.no_grad():
            logp = torch.log_softmax(m(input_ids=ids, use_cache=False).logits[:, :-1].double(), -1)
        return float((ref.exp() * (ref - logp)).sum(-1).mean())

    full = store.masks.all(axis=1)
    assert store.loss[full][0] == pytest.approx(0.0, abs=1e-9)
    plans = json.loads((out / "plans.json").read_text())
    assert plans["utility"] == "kl"
    for p in summary["plans"]:
        # the tiny vocabulary (< top-k) makes the stored KL the exact divergence
        assert p["loss"] == pytest.approx(kl_deleted(p["removed"]), rel=1e-4, abs=1e-7)
        assert p["perplexity"] == pytest.approx(math.exp(loss_with_layers_deleted(model_dir, store.windows,
                                                                                  p["removed"])), rel=1e-5)
