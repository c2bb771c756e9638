"""``layershap prune`` and ``layershap evaluate``: the pruned model written from a scores file computes what the
masked model computes, held-out perplexity matches HF's own loss, and scores of another model are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_tokenizer, save_tiny_model_dir
from transformers import AutoModelForCausalLM

from layershap.cli.main import main
from layershap.oracle.layers import skip_layers
from layershap.oracle.loading import load_model
from layershap.shapley.game import Scores
from layershap.shapley.scores_io import write_scores


def _ids(seed: int = 0, length: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (2, length), generator=g)


def _scores_file(path, n_layers, values, model_id, model_hash):
    scores = Scores(values=np.asarray(values, float), stderr=np.zeros(n_layers), method="exact", index="shapley",
                    n_evals=2**n_layers)
    write_scores(path, scores, {"model_id": model_id, "model_hash": model_hash, "n_layers": n_layers})
    return path


def test_prune_and_evaluate_cli(tmp_path, capsys):
    src = save_tiny_model_dir(tmp_path / "tiny", "llama", 4, seed=7)
    lm = load_model(str(src), device="cpu")
    scores = _scores_file(tmp_path / "scores.json", 4, [0.5, -0.1, 0.9, 0.05], lm.model_id, lm.model_hash)
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(src), "--scores", str(scores), "--remove", "2", "--by-score", "--out",
                 str(out)]) == 0
    assert "removed layers [1, 3]" in capsys.readouterr().out
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _ids(5)
    with torch.inference_mode(), skip_layers(lm.model, np.array([True, False, True, False])):
        expected = lm.model(input_ids=ids, use_cache=False).logits
        got = reloaded(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

    # evaluate: exp(mean NLL) over consecutive windows with BOS, against HF's own loss on windows built here
    from pydoc_data.topics import topics

    text_file = tmp_path / "heldout.txt"
    text_file.write_text(topics["if"] + topics["while"])
    assert main(["evaluate", "--model", str(out), "--text", str(text_file), "--seq-len", "16", "--windows", "3"]) == 0
    printed = capsys.readouterr().out
    nll = float(next(line.split()[1] for line in printed.splitlines() if line.startswith("nll")))
    tok = make_tiny_tokenizer()
    stream = tok(text_file.read_text(), add_special_tokens=False)["input_ids"][:48]
    windows = torch.cat([torch.full((3, 1), tok.bos_token_id), torch.tensor(stream).reshape(3, 16)], 1)
    with torch.inference_mode():
        loss = reloaded(input_ids=windows, labels=windows, use_cache=False).loss.item()
    assert nll == pytest.approx(loss, abs=2e-6)
    ppl = float(next(line.split()[1] for line in printed.splitlines() if line.startswith("perplexity")))
    assert ppl == pytest.approx(np.exp(nll), rel=1e-4)

    # --layers needs no scores
    assert main(["prune", "--model", str(src), "--layers", "0", "--out", str(tmp_path / "p0")]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "p0").config.num_hidden_layers == 3


def test_prune_cli_refuses_scores_of_another_model(tmp_path, capsys):
    src = save_tiny_model_dir(tmp_path / "tiny", "llama", 4, seed=8)
    lm = load_model(str(src), device="cpu")
    five = _scores_file(tmp_path / "five.json", 5, np.arange(5.0), lm.model_id, lm.model_hash)
    assert main(["prune", "--model", str(src), "--scores", str(five), "--remove", "1", "--by-score", "--out",
                 str(tmp_path / "a")]) == 2
    assert "5-layer model" in capsys.readouterr().err
    other = _scores_file(tmp_path / "other.json", 4, np.arange(4.0), "some/other-model", "weights-v1:" + "f" * 64)
    assert main(["prune", "--model", str(src), "--scores", str(other), "--remove", "1", "--by-score", "--out",
                 str(tmp_path / "b")]) == 2
    assert "different models" in capsys.readouterr().err
    assert main(["prune", "--model", str(src), "--out", str(tmp_path / "c")]) == 2
    assert "say which layers" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_prune_removes_the_verified_plan_by_default_and_the_lowest_scores_with_by_score(tmp_path, capsys):
    """A plans.json beside scores.json: the default prunes the plan's layers, --by-score the K lowest scores."""
    import json

    src = save_tiny_model_dir(tmp_path / "tiny", "llama", 5, seed=3)
    lm = load_model(str(src), device="cpu")
    run = tmp_path / "run"
    run.mkdir()
    scores = _scores_file(run / "scores.json", 5, [0.1, 0.2, 0.9, 0.8, 0.7], lm.model_id, lm.model_hash)
    plan = {"k": 2, "removed": [2, 4], "loss": 3.0, "perplexity": 20.1, "decision_loss": 3.1,
            "decision_perplexity": 22.2, "margin_se": 4.0, "runner_up": [2, 3], "separated": True}
    (run / "plans.json").write_text(json.dumps({"format": "layershap-plans", "format_version": 2,
                                                "model_id": lm.model_id, "model_hash": lm.model_hash,
                                                "n_layers": 5, "plans": [plan]}))
    ids = _ids(9)

    def kept_layers_logits(out, keep):
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.inference_mode(), skip_layers(lm.model, np.array(keep)):
            expected = lm.model(input_ids=ids, use_cache=False).logits
            got = reloaded(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=0)

    assert main(["prune", "--model", str(src), "--scores", str(scores), "--remove", "2", "--out",
                 str(tmp_path / "plan")]) == 0
    printed = capsys.readouterr().out
    assert "removed layers [2, 4]" in printed and "verified plan for K = 2" in printed
    kept_layers_logits(tmp_path / "plan", [True, True, False, True, False])
    assert main(["prune", "--model", str(src), "--plans", str(run), "--remove", "2", "--out",
                 str(tmp_path / "plan2")]) == 0
    kept_layers_logits(tmp_path / "plan2", [True, True, False, True, False])
    assert main(["prune", "--model", str(src), "--scores", str(scores), "--remove", "2", "--by-score", "--out",
                 str(tmp_path / "score")]) == 0
    assert "removed layers [0, 1]" in capsys.readouterr().out
    kept_layers_logits(tmp_path / "score", [False, False, True, True, True])
    # a K the plans file lacks, and no plans file at all: one line naming what to run
    assert main(["prune", "--model", str(src), "--plans", str(run), "--remove", "3", "--out", str(tmp_path / "x")]) == 2
    assert "no plan for K = 3" in capsys.readouterr().err
    assert main(["prune", "--model", str(src), "--plans", str(tmp_path), "--remove", "2", "--out",
                 str(tmp_path / "y")]) == 2
    assert "layershap plan" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
