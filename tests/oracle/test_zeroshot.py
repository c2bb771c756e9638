"""Zero-shot accuracy through lm-evaluation-harness on tiny random models and a tiny local task, against an
independent computation (plain forward passes, argmax of the choices' log-likelihoods)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_tiny_model, make_tiny_tokenizer, save_tiny_model_dir
from zeroshot_support import ITEMS, TASK, reference_accuracy, reference_pairs, write_task

from layershap.cli.main import main
from layershap.core.masks import masks_from_removed
from layershap.oracle.tasks import TaskError, encode_pair, load_choice_task, load_tasks
from layershap.oracle.zeroshot import ZeroShot, accuracy


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path_factory, monkeypatch):
    """datasets writes its arrow cache under the test's tmp dir, and never asks the hub."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-datasets")))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("tasks") / "mine")


@pytest.fixture(scope="module")
def tiny():
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model("llama", 4, seed=5)
    model.config.bos_token_id = tokenizer.bos_token_id
    return model, tokenizer


def _lls(results: dict) -> list[list[float]]:
    return [[float(r[0]) for r in s["filtered_resps"]] for s in sorted(results["samples"][TASK],
                                                                        key=lambda s: s["doc_id"])]


def test_accuracy_matches_plain_forward_passes(task_dir, tiny, one_thread, tmp_path, monkeypatch):
    model, tok = tiny
    monkeypatch.chdir(tmp_path)  # data_files are relative to the YAML, not to the working directory
    zs = ZeroShot([TASK], task_dir=task_dir, log_samples=True)
    for removed in ([], [1, 2]):
        mask = masks_from_removed(removed, 4)[0] if removed else None
        results = zs.evaluate(model, tok, mask)
        ref = reference_accuracy(model, tok, removed)
        got = accuracy(results)[TASK]
        assert got["n"] == len(ITEMS)
        for metric in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
            assert got[metric] == pytest.approx(ref[metric], abs=1e-12), (removed, metric)
        assert np.allclose(_lls(results), ref["lls"], atol=1e-4)
        assert results["layershap"]["removed_layers"] == removed
        assert results["configs"][TASK]["output_type"] == "multiple_choice"  # lm-eval's own results format
    dense, pruned = reference_accuracy(model, tok), reference_accuracy(model, tok, [1, 2])
    assert not np.allclose(dense["lls"], pruned["lls"], atol=1e-2)  # the mask changed what was measured
    assert (dense["acc"], dense["acc_norm"]) != (1.0, 1.0)
    # same batch size and seed: a rerun gives the same numbers, and the model is left as it was
    again = zs.evaluate(model, tok, masks_from_removed([1, 2], 4)[0])
    assert again["results"] == results["results"] and _lls(again) == _lls(results)
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4 and model.config.use_cache


def test_in_memory_mask_equals_saved_pruned_model(tmp_path, capsys):
    """`evaluate --layers` (skipped in memory) and `prune --layers` + `evaluate` of the saved model agree."""
    write_task(tmp_path / "tasks")
    model_dir = save_tiny_model_dir(tmp_path / "tiny", "gemma3", 4, seed=2)  # sliding + full attention layers
    common = ["--tasks", TASK, "--task-dir", str(tmp_path / "tasks"), "--device", "cpu", "--log-samples"]
    from pydoc_data.topics import topics

    (tmp_path / "heldout.txt").write_text(topics["if"] + topics["while"])
    text = ["--text", str(tmp_path / "heldout.txt"), "--seq-len", "16", "--windows", "3"]
    assert main(["evaluate", "--model", str(model_dir), "--layers", "0,2", "--out", str(tmp_path / "a.json"),
                 *common, *text, "--json", str(tmp_path / "a-ppl.json")]) == 0
    assert main(["prune", "--model", str(model_dir), "--layers", "0,2", "--out", str(tmp_path / "pruned")]) == 0
    assert main(["evaluate", "--model", str(tmp_path / "pruned"), "--out", str(tmp_path / "b.json"), *common,
                 *text, "--json", str(tmp_path / "b-ppl.json")]) == 0
    ppl_a, ppl_b = (json.loads((tmp_path / f).read_text()) for f in ("a-ppl.json", "b-ppl.json"))
    assert ppl_a["removed_layers"] == [0, 2] and ppl_b["removed_layers"] == [] and ppl_b["n_layers"] == 2
    assert ppl_a["nll"] == pytest.approx(ppl_b["nll"], abs=1e-5) and ppl_a["n_tokens"] == ppl_b["n_tokens"] == 48
    assert main(["evaluate", "--model", str(model_dir), "--out", str(tmp_path / "dense.json"), *common]) == 0
    printed = capsys.readouterr().out
    assert "acc_norm" in printed and "layers [0, 2] skipped" in printed
    a, b, dense = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json", "dense.json"))
    assert a["layershap"]["n_layers"] == 4 and b["layershap"]["n_layers"] == 2
    for metric in ("acc", "acc_norm"):
        assert accuracy(a)[TASK][metric] == accuracy(b)[TASK][metric]
    assert np.allclose(_lls(a), _lls(b), atol=1e-4)
    assert not np.allclose(_lls(a), _lls(dense), atol=1e-2)


def test_choice_loader_gives_lm_evals_requests(task_dir, tiny):
    """The loader's token ids are the reference's, and lm-eval's HFLM tokenises its requests the same way."""
    from lm_eval.models.huggingface import HFLM

    model, tok = tiny
    task = load_choice_task(TASK, tok, task_dir=task_dir)
    ref = reference_pairs(tok)
    assert [it.gold for it in task.items] == [g for _, _, g, _ in ref]
    for item, (contexts, conts, _, chars) in zip(task.items, ref):
        assert [list(c) for c in item.contexts] == contexts and [list(c) for c in item.continuations] == conts
        assert list(item.choice_chars) == chars
    assert len(load_choice_task(TASK, tok, task_dir=task_dir, limit=5).items) == 5
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1)
    for context, continuation in [("Question: x?\nAnswer: ", "yes"), ("Q", " no"), ("", "only an answer")]:
        if context:
            assert encode_pair(tok, context, continuation) == lm._encode_pair(context, continuation)
        else:  # an empty context: lm-eval's loglikelihood puts BOS in front
            ids = tok.encode(continuation, add_special_tokens=False)
            assert encode_pair(tok, context, continuation) == ([tok.bos_token_id], ids)
    assert task.sha256() == load_choice_task(TASK, tok, task_dir=task_dir).sha256()
    assert task.sha256() != load_choice_task(TASK, tok, task_dir=task_dir, limit=5).sha256()


def test_missing_tasks_give_one_line(tmp_path, tiny_model_dir, capsys):
    # a registry task whose data are not reachable (offline): one line naming the fixes
    assert main(["evaluate", "--model", str(tiny_model_dir), "--tasks", "piqa"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "task 'piqa'" in err and "HF_HUB_OFFLINE=1" in err and "--task-dir" in err
    with pytest.raises(TaskError, match="neither lm-eval's registry nor --task-dir"):
        load_tasks(["no_such_task_anywhere"], write_task(tmp_path / "t"))
    # a local task file whose data are a hub dataset: the same fixes
    hub = (tmp_path / "t" / f"{TASK}.yaml").read_text().replace("dataset_path: json", "dataset_path: nobody/nothing")
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "hub_mc.yaml").write_text(hub.replace(f"task: {TASK}", "task: hub_mc"))
    with pytest.raises(TaskError, match="task 'hub_mc': its data could not be loaded .*HF_HUB_OFFLINE=1"):
        load_tasks(["hub_mc"], tmp_path / "hub")
    # a local task whose data file is missing, and a folder that is not there
    (tmp_path / "t" / "items.jsonl").unlink()
    with pytest.raises(TaskError, match="data files could not be read"):
        load_tasks([TASK], tmp_path / "t")
    assert main(["evaluate", "--model", str(tiny_model_dir), "--tasks", TASK, "--task-dir",
                 str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tiny_model_dir)]) == 2
    assert "--text" in capsys.readouterr().err
