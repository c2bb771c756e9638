"""Export formats: the llm-compressor recipe's structure, the plain list and the JSON agree with the mapping."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from layershap.cli.export import export
from layershap.cli.main import main
from layershap.core.errors import LayershapError
from layershap.pruning.export_formats import recipe_document
from layershap.shapley.scores_io import FORMAT

SCORES = [0.1, 0.5, 0.3]  # mapped onto [0.62, 0.78]: [0.78, 0.62, 0.70], mean 0.7


@pytest.fixture
def scores_file(tmp_path):
    doc = {"format": FORMAT, "format_version": 1, "model_id": "tiny", "n_layers": 3, "method": "exact",
           "index": "shapley", "utility": "-nll (nats)", "scores": SCORES, "stderr": [0.0] * 3,
           "ranking": [0, 2, 1]}
    path = tmp_path / "scores.json"
    path.write_text(json.dumps(doc))
    return path


def test_recipe_structure_for_sparsegpt_and_opt_paths():
    recipe = recipe_document([0.6, 0.8], layer_prefix="model.decoder.layers", modifier="sparsegpt",
                             pattern="unstructured", sequential_target="OPTDecoderLayer")
    args = recipe["sparsity_stage"]["sparsity_modifiers"]["SparseGPTModifier"]
    assert args == {"sparsity": {"model.decoder.layers.0": 0.6, "model.decoder.layers.1": 0.8},
                    "mask_structure": "0:0", "targets": ["model.decoder.layers.0", "model.decoder.layers.1"],
                    "ignore": ["re:.*lm_head"], "sequential_targets": ["OPTDecoderLayer"]}
    with pytest.raises(LayershapError, match="modifier"):
        recipe_document([0.5], modifier="obs")


@pytest.mark.parametrize("fmt", ["json", "llmcompressor", "list"])
def test_every_format_holds_the_same_sparsities(fmt, scores_file, tmp_path, capsys):
    out = tmp_path / f"out.{fmt}"
    assert export(str(scores_file), sparsity=0.7, lam=0.08, format=fmt, out=str(out)) == 0
    text = out.read_text()
    if fmt == "json":
        values = json.loads(text)["sparsities"]
    elif fmt == "list":
        values = [float(x) for x in text.split()]
    else:
        values = list(yaml.safe_load(text)["sparsity_stage"]["sparsity_modifiers"]["WandaPruningModifier"]
                      ["sparsity"].values())
    np.testing.assert_allclose(values, [0.78, 0.62, 0.70], atol=1e-6)
    assert "mean sparsity 0.700000" in capsys.readouterr().out


def test_export_refuses_bad_format_and_budget(scores_file, tmp_path):
    with pytest.raises(LayershapError, match="--format"):
        export(str(scores_file), sparsity=0.7, format="csv")
    with pytest.raises(LayershapError, match="too large"):
        export(str(scores_file), sparsity=0.9, lam=0.2)


def test_dispatcher_writes_the_format_beside_the_scores(scores_file, capsys):
    assert main(["export", str(scores_file), "--sparsity", "0.7", "--lambda", "0.08", "--format", "list"]) == 0
    listed = [float(x) for x in (scores_file.parent / "scores.sparsity-0.7.txt").read_text().split()]
    np.testing.assert_allclose(listed, [0.78, 0.62, 0.70], atol=1e-6)
    assert main(["export", str(scores_file), "--sparsity", "0.7", "--format", "csv"]) == 2
    assert capsys.readouterr().err.startswith("layershap export: error: --format")
