"""Heal-aware measurement and plans: a healed set's loss equals an independent computation (a fit through
``fit_healing`` and a plain Hugging Face forward with ``labels=`` of the healed model), the span fits from the
recorded dense states equal the single-set fits, and ``plan --heal linear`` writes healed plans beside the
unhealed ones in stores that refuse unhealed rows."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_model, save_tiny_model_dir

from layershap.cli.main import main
from layershap.core.errors import LayershapError, StoreMismatchError
from layershap.core.masks import masks_from_removed
from layershap.oracle.evaluate import MaskedEvaluator
from layershap.oracle.session import open_session
from layershap.oracle.store import DatasetStore
from layershap.oracle.text import load_text, make_windows
from layershap.pipeline.heal_plans import heal_fit_windows
from layershap.pruning.heal import fit_healing, healing_applied
from layershap.pruning.heal_aware import HealedEvaluator, SpanFitter


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _windows(n: int, length: int, seed: int) -> np.ndarray:
    ids = torch.randint(3, 300, (n, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 0  # a BOS column
    return ids.numpy()


def _reference(model, fit: np.ndarray, removed: list[int]):
    """``fit_healing`` of ``removed``; a span starting at layer 0 (no carrier) stays unpatched but removed."""
    rest = [i for i in removed if i not in removed_spans_from_zero(removed)]
    if not rest:
        healing = fit_healing(model, fit, [removed[-1] + 1], "linear", progress=False)  # any fit, then no span
        return dataclasses.replace(healing, removed=list(removed), spans=[])
    healing = fit_healing(model, fit, rest, "linear", progress=False)
    return dataclasses.replace(healing, removed=list(removed))


def removed_spans_from_zero(removed: list[int]) -> set[int]:
    """The removed layers 0, 1, ... up to the first kept one."""
    out, i = set(), 0
    while i in removed:
        out.add(i)
        i += 1
    return out


def _hf_nll(model, windows: np.ndarray) -> float:
    """Mean token NLL by Hugging Face's own loss, window by window (equal lengths: the mean of the means)."""
    with torch.no_grad():
        ids = torch.as_tensor(windows)
        return float(np.mean([model(input_ids=row[None], labels=row[None], use_cache=False).loss.item()
                              for row in ids]))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("method", ["bias", "linear", "lowrank:4"])
def test_healed_loss_equals_fit_healing_and_a_plain_forward(arch, method):
    model = make_tiny_model(arch, 6, seed=1)
    fit, calib = _windows(8, 24, 0), _windows(3, 16, 1)
    healed = HealedEvaluator(MaskedEvaluator(model, calib, batch_size=2), SpanFitter(model, fit, method))
    sets = [(2, 3), (1, 4), (2, 3, 4)]
    got = healed.nll(masks_from_removed(sets, 6))
    for removed, value in zip(sets, got):
        reference = fit_healing(model, fit, removed, method, progress=False)
        with healing_applied(model, reference):
            assert value == pytest.approx(_hf_nll(model, calib), rel=1e-4)
        fitted = SpanFitter(model, fit, method).healing(removed)
        for a, b in zip(fitted.spans, reference.spans):
            for name in ("delta", "down", "up", "bias"):
                x, y = getattr(a, name), getattr(b, name)
                assert (x is None) == (y is None)
                if x is not None:
                    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    # the patches are gone afterwards: the model is the dense one again
    plain = MaskedEvaluator(model, calib, batch_size=2)
    assert plain.nll(np.ones((1, 6), bool))[0] == pytest.approx(_hf_nll(model, calib), rel=1e-5)


def test_healing_changes_the_loss_and_a_span_at_layer_0_stays_unhealed():
    model = make_tiny_model("llama", 6, seed=2)
    fit, calib = _windows(8, 24, 0), _windows(3, 16, 1)
    plain = MaskedEvaluator(model, calib, batch_size=2)
    healed = HealedEvaluator(plain, SpanFitter(model, fit, "linear"))
    masks = masks_from_removed([(0,), (0, 1), (3,), ()], 6)
    a, b = healed.nll(masks), plain.nll(masks)
    np.testing.assert_allclose(a[[0, 1, 3]], b[[0, 1, 3]], rtol=1e-6)
    assert abs(a[2] - b[2]) > 1e-4


def test_distill_and_sublayers_are_refused(tmp_path, capsys):
    model = make_tiny_model("llama", 4, seed=0)
    with pytest.raises(LayershapError, match="distill"):
        SpanFitter(model, _windows(4, 16, 0), "distill")
    with pytest.raises(LayershapError, match="whole blocks"):
        HealedEvaluator(MaskedEvaluator(model, _windows(2, 16, 0), players="sublayers"),
                        SpanFitter(model, _windows(4, 16, 0), "bias"))
    assert main(["plan", "--model", "nowhere", "--heal", "distill", "--out", str(tmp_path / "p")]) != 0
    assert "distill" in capsys.readouterr().err


def test_plan_with_heal_writes_healed_plans_in_stores_of_their_own(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = save_tiny_model_dir(tmp_path / "tiny", "llama", 6, seed=4)
    out = tmp_path / "plan"
    argv = ["plan", "--model", str(model_dir), "--remove", "1,2", "--windows", "2", "--seq-len", "16",
            "--heal", "linear", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "healed with linear" in printed
    doc = json.loads((out / "heal-linear" / "plans.json").read_text())
    unhealed = json.loads((out / "plans.json").read_text())
    assert doc["unhealed"] == {str(p["k"]): p["removed"] for p in unhealed["plans"]}
    assert doc["heal"]["method"] == "linear" and doc["heal"]["fit_windows"] * doc["heal"]["fit_seq_len"] >= 4096
    store = DatasetStore.open(out / "heal-linear" / "dataset.zarr")
    assert store.attrs["heal"].startswith("linear;")
    session = open_session(model=str(model_dir), text="builtin", masks="loo", out=out / "dataset.zarr",
                           windows=2, seq_len=16)
    with session:
        model = session.loaded.model
        fit = heal_fit_windows(session, text="builtin", seed=0, n_blocks=doc["budget"]["max_blocks"])
        assert fit.shape[0] * (fit.shape[1] - 1) >= 16 * 256
        # the fit text is in no calibration window and no decision block: of their 12-token runs, next to none
        # recurs in the fit windows (overlapping windows would share most; the text repeats a few runs)
        def runs(windows: np.ndarray) -> set:
            return {tuple(r[i:i + 12]) for r in windows for i in range(1, len(r) - 12)}

        blocks = [DatasetStore.open(out / f"decision-{b}.zarr").windows for b in range(len(doc["decision"]["blocks"]))]
        for windows in [store.windows, *blocks]:
            assert len(runs(fit) & runs(windows)) <= 0.05 * len(runs(windows))
        overlapping = make_windows(session.loaded.tokenizer, load_text("builtin").text, 16, 256, 0)
        assert len(runs(overlapping) & runs(store.windows)) > 0.05 * len(runs(store.windows))  # the check can fail
        for p in doc["plans"]:
            reference = _reference(model, fit, p["removed"])
            with healing_applied(model, reference):
                assert p["loss"] == pytest.approx(_hf_nll(model, store.windows), rel=1e-4)
        # the healed store is not the unhealed one: opened with the unhealed identity, it refuses
        with pytest.raises(StoreMismatchError, match="heal"):
            DatasetStore.create_or_open(out / "heal-linear" / "dataset.zarr", session.store.identity,
                                        session.store.windows)
    for b in range(len(doc["decision"]["blocks"])):
        assert DatasetStore.open(out / "heal-linear" / f"decision-{b}.zarr").attrs["heal"] == store.attrs["heal"]
    assert main(argv) == 0  # a rerun measures nothing new
    again = json.loads((out / "heal-linear" / "plans.json").read_text())
    assert again["passes"] == 0 and [p["removed"] for p in again["plans"]] == [p["removed"] for p in doc["plans"]]


def test_run_with_heal_adds_the_healed_plans_to_the_summary(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = save_tiny_model_dir(tmp_path / "tiny", "llama", 6, seed=4)
    out = tmp_path / "run"
    assert main(["run", "--model", str(model_dir), "--out", str(out), "--n-masks", "30", "--windows", "2",
                 "--seq-len", "16", "--members", "2", "--hidden", "32", "--remove", "1", "--heal", "bias",
                 "--no-progress", "--no-register"]) == 0
    assert "plans for the model healed with bias" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    healed = json.loads((out / "heal-bias" / "plans.json").read_text())
    assert summary["healed_plans"]["plans"] == healed["plans"] and healed["heal"]["method"] == "bias"
    assert [p["k"] for p in healed["plans"]] == [1]
