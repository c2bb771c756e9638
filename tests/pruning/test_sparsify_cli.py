"""``sparsify`` end to end on a tiny saved model: the saved model reloads with plain from_pretrained and computes
what the model pruned in memory computes; the JSON, recipe and list agree with the counted zeros; bad input is
refused before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from layershap.cli.main import main
from layershap.cli.sparsify import sparsify
from layershap.core.errors import LayershapError
from layershap.oracle.loading import load_model
from layershap.oracle.text import load_text, make_windows
from layershap.pruning.allocation import layer_budgets
from layershap.pruning.sparsify import decoder_linears, owl_outlier_ratios, sparsify_layers
from layershap.shapley.scores_io import FORMAT

CALIB = {"windows": 2, "seq_len": 32, "seed": 3}


def _scores_file(path, n_layers: int, values) -> str:
    doc = {"format": FORMAT, "format_version": 1, "n_layers": n_layers, "method": "exact", "index": "shapley",
           "utility": "-nll (nats)", "scores": list(values), "stderr": [0.0] * n_layers,
           "ranking": [int(i) for i in np.argsort(values)]}
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("allocation", ["owl", "scores"])
def test_saved_model_reloads_and_matches_in_memory_pruning(allocation, tiny_model_dir, tmp_path, one_thread):
    scores = _scores_file(tmp_path / "scores.json", 4, [0.5, 2.0, -0.3, 1.1])
    out = tmp_path / "sparse"
    assert sparsify(model=str(tiny_model_dir), sparsity=0.6, out=str(out), allocation=allocation,
                    scores=str(scores), lam=0.1, progress=False, **CALIB) == 0

    # the same pruning done here, in memory, on a fresh load
    lm = load_model(str(tiny_model_dir), device="cpu")
    windows = make_windows(lm.tokenizer, load_text("builtin").text, CALIB["windows"], CALIB["seq_len"],
                           CALIB["seed"])
    values = owl_outlier_ratios(lm.model, windows) if allocation == "owl" else np.array([0.5, 2.0, -0.3, 1.1])
    budgets = layer_budgets(allocation, 4, 0.6, 0.1, values)
    sparsify_layers(lm.model, windows, budgets, progress=False)

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.as_tensor(windows)
    with torch.no_grad():
        expected = lm.model(input_ids=ids, use_cache=False).logits
        got = reloaded(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

    doc = json.loads((out / "layershap_sparsity.json").read_text())
    zeros = [sum(int((m.weight == 0).sum()) for _, m in layer) / sum(m.weight.numel() for _, m in layer)
             for layer in decoder_linears(reloaded)]
    np.testing.assert_allclose(doc["sparsities"], budgets, rtol=0, atol=1e-12)
    assert doc["achieved_sparsities"] == zeros
    assert np.mean(zeros) == pytest.approx(0.6, abs=1e-4)                 # whole weights: within one weight
    assert sum(m.numel() for m in reloaded.model.embed_tokens.parameters()) == int(
        (reloaded.model.embed_tokens.weight != 0).sum())                   # embeddings untouched
    listed = [float(x) for x in (out / "sparsities.txt").read_text().split()]
    np.testing.assert_allclose(listed, budgets, atol=1e-6)


def test_recipe_names_real_decoder_layers(tiny_model_dir, tmp_path, one_thread):
    out = tmp_path / "uniform"
    sparsify(model=str(tiny_model_dir), sparsity=0.5, out=str(out), allocation="uniform", pattern="2:4",
             progress=False, **CALIB)
    recipe = yaml.safe_load((out / "sparsity_recipe.yaml").read_text())
    (stage,) = recipe.values()
    (modifiers,) = stage.values()
    args = modifiers["WandaPruningModifier"]
    model = AutoModelForCausalLM.from_pretrained(out)
    modules = dict(model.named_modules())
    assert args["targets"] == list(args["sparsity"]) == [f"model.layers.{i}" for i in range(4)]
    assert all(type(modules[name]).__name__ == args["sequential_targets"][0] for name in args["targets"])
    assert all(any(isinstance(m, torch.nn.Linear) for m in modules[name].modules()) for name in args["targets"])
    assert set(args["sparsity"].values()) == {0.5}
    assert args["mask_structure"] == "2:4" and args["ignore"] == ["re:.*lm_head"]
    for layer in decoder_linears(model):
        for _, m in layer:
            assert torch.all((m.weight.reshape(-1, 4) == 0).sum(dim=1) == 2)


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"sparsity": 1.0}, "[0, 1)"),
    ({"sparsity": -0.2}, "[0, 1)"),
    ({"sparsity": 0.7, "lam": 0.35}, "too large"),
    ({"sparsity": 0.6, "pattern": "2:4", "allocation": "uniform"}, "--sparsity 0.5"),
    ({"sparsity": 0.5, "pattern": "4:2", "allocation": "uniform"}, "not understood"),
    ({"sparsity": 0.5, "method": "sparsegpt", "allocation": "uniform"}, "--method"),
    ({"sparsity": 0.5, "allocation": "scores"}, "--scores"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(kwargs, fragment, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/<model>/scores.json here
    out = tmp_path / "never"
    with pytest.raises(LayershapError) as info:
        sparsify(model=str(tiny_model_dir), out=str(out), progress=False, **kwargs)
    assert fragment in str(info.value)
    assert not out.exists()


def test_scores_of_another_model_are_refused(tiny_model_dir, tmp_path, one_thread):
    scores = _scores_file(tmp_path / "s.json", 5, [0.1, 0.2, 0.3, 0.4, 0.5])
    with pytest.raises(LayershapError, match="5-layer model"):
        sparsify(model=str(tiny_model_dir), sparsity=0.5, out=str(tmp_path / "o"), scores=str(scores), progress=False,
                 **CALIB)


def test_a_foreign_non_empty_out_dir_is_refused(tiny_model_dir, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LayershapError, match="non-empty"):
        sparsify(model=str(tiny_model_dir), sparsity=0.5, out=str(out), allocation="uniform", progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_dispatcher_maps_lambda_and_refuses_bad_numbers_in_one_line(tiny_model_dir, tmp_path, capsys, one_thread):
    def args(out):
        return ["sparsify", "--model", str(tiny_model_dir), "--sparsity", "0.6", "--allocation", "owl",
                "--out", str(out), "--windows", "2", "--seq-len", "32", "--no-progress"]

    out = tmp_path / "owl"
    assert main([*args(out), "--lambda", "0.05"]) == 0
    doc = json.loads((out / "layershap_sparsity.json").read_text())
    assert doc["lambda"] == 0.05 and doc["allocation"] == "owl" and doc["calibration"]["windows"] == 2
    ratios = np.array(doc["values"])  # OWL's formula on the recorded outlier ratios: span 2 x lambda, mean 0.6
    u = (ratios - ratios.min()) / (ratios.max() - ratios.min())
    np.testing.assert_allclose(doc["sparsities"], 0.6 + 2 * 0.05 * (u.mean() - u), rtol=0, atol=1e-12)
    capsys.readouterr()
    never = tmp_path / "never"
    for bad, message in [(["--lambda", "-1"], "--lambda must be 0 or more"),
                         (["--windows", "0"], "--windows must be at least 1")]:
        assert main([*args(never), *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("layershap sparsify: error: ") and message in err and err.count("\n") == 1
    assert not never.exists()
