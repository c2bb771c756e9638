"""The committed artifacts of the embedded default are consistent and usable offline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from layershap.cli.main import main
from layershap.oracle.identity import check_same_model
from layershap.oracle.store import DatasetStore
from layershap.surrogate.checkpoint import load_surrogate

ART = Path(__file__).resolve().parents[2] / "artifacts" / "gemma-3-270m"


def test_artifact_surrogate_belongs_to_its_dataset():
    store = DatasetStore.open(ART / "dataset.zarr")
    surrogate = load_surrogate(ART / "surrogate")
    trained_rows = surrogate.metadata["split"]["rows"]  # the main job trains on every row it measured
    assert trained_rows == len(store)
    assert surrogate.metadata["dataset_hash"] == store.content_hash(rows=trained_rows)
    check_same_model(surrogate.metadata, store.attrs, what="the surrogate", fix="retrain it")
    assert store.n_layers == surrogate.n_layers == 18
    assert surrogate.removed_counts == sorted({int(r) for r in (~store.masks).sum(axis=1)})
    # the stored nll of layer 5 removed alone is catastrophic (perplexity ~1e7)
    only5 = np.ones(18, bool)
    only5[5] = False
    row = np.flatnonzero((store.masks == only5).all(axis=1))
    assert len(row) == 1 and math.exp(store.nll[row[0]]) > 1e6


def test_shapley_on_artifact_surrogate_runs_offline(tmp_path, capsys):
    out = tmp_path / "scores.json"
    assert main(["shapley", str(ART / "surrogate"), "--out", str(out), "--no-progress"]) == 0
    doc = json.loads(out.read_text())
    assert doc["n_layers"] == 18 and sorted(doc["ranking"]) == list(range(18))
    # auto covers the removed-layer counts the held-out metrics validate: 7..9 removed are in the data but too
    # few of their rows are held out (4 each, fewer than 5) to validate them, so the range stops before 7
    not_validated = {entry["removed"]: entry["why"] for entry in doc["coverage"]["not_validated"]}
    assert {7, 8, 9} <= set(not_validated) and all("held-out rows" in why or "Spearman" in why
                                                    for why in not_validated.values())
    assert doc["index"] == f"semivalue[1:{min(not_validated) - 1}]"
    assert set(doc["coverage"]["removed_counts_weighted"]).isdisjoint(not_validated)
    assert 5 in doc["ranking"][-3:]  # the cornerstone layer is among the three most important
    assert out.with_suffix(".png").stat().st_size > 0
