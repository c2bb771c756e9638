"""The task utility (``--utility task:FILE``): a mask's loss is the mean NLL of a local multiple-choice task's gold
answers, checked against plain forward passes of copies with the layers deleted; stores of one utility refuse
the other's masks; ``plan --utility task:FILE`` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import save_tiny_model_dir
from zeroshot_support import ITEMS, reference_accuracy, write_task

from layershap.cli.main import main
from layershap.core.errors import LayershapError, MaskError, StoreMismatchError
from layershap.core.masks import masks_from_removed
from layershap.oracle.evaluate import MaskedEvaluator
from layershap.oracle.loading import load_model
from layershap.oracle.measure import measure_masks
from layershap.oracle.session import open_session
from layershap.oracle.store import DatasetStore
from layershap.oracle.task_utility import answer_windows, open_task, parse_utility, split_task
from layershap.oracle.tasks import ChoiceItem, ChoiceTask


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path_factory, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-datasets")))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def task_yaml(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("tasks") / "mine") / "tiny_mc.yaml"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m", "llama", 4, seed=3)


def test_parse_utility_names_the_forms():
    assert parse_utility("nll") == ("nll", None)
    assert parse_utility("task:a/b.yaml") == ("task", "a/b.yaml")
    for bad in ("task:", "ppl", "task"):
        with pytest.raises(LayershapError, match="task:FILE"):
            parse_utility(bad)


def test_answer_windows_weigh_exactly_the_positions_that_predict_the_gold_answer():
    # question 1's gold is its second choice: its own context and answer
    item = ChoiceItem(0, ((1, 2), (1, 2)), ((3,), (4, 5, 6)), 1, (1, 3))
    w = answer_windows([item, ChoiceItem(1, ((7,),), ((8,),), 0, (1,))], pad_id=9)
    assert w.ids.tolist() == [[1, 2, 4, 5, 6], [7, 8, 9, 9, 9]]
    # position t predicts token t + 1: the answer tokens 4, 5, 6 sit at 2..4, predicted from 1..3
    assert w.weights.tolist() == [[0, 1, 1, 1], [1, 0, 0, 0]]


def test_split_is_seeded_disjoint_and_covers_every_question():
    items = tuple(ChoiceItem(i, ((1, 2 + i),), ((3,),), 0, (1,)) for i in range(30))
    task = ChoiceTask("t", items)
    a, b, c = (split_task(task, "t.yaml", s, 0) for s in (0, 0, 1))
    assert a.calibration.ids.tolist() == b.calibration.ids.tolist()
    assert a.calibration.ids.tolist() != c.calibration.ids.tolist()
    seen = [int(r[1]) - 2 for r in a.calibration.ids] + [it.doc_id for it in a.decision]
    assert sorted(seen) == list(range(30)) and a.calibration.ids.shape[0] == 10
    blocks = a.decision_blocks(3)
    assert [blk.ids.shape[0] for blk in blocks] == [6, 6, 6]
    firsts = {int(r[1]) for blk in blocks for r in blk.ids}
    assert len(firsts) == 18 and not firsts & {int(r[1]) for r in a.calibration.ids}
    with pytest.raises(LayershapError, match="at least"):
        split_task(ChoiceTask("t", items[:5]), "t.yaml", 0, 0)


@pytest.mark.parametrize("removed", [(), (1,), (0, 2)])
def test_task_loss_is_the_mean_gold_answer_nll_of_a_deleted_layer_copy(model_dir, task_yaml, removed):
    """Independent reference: one plain forward pass per choice of a copy with the layers deleted
    (``reference_accuracy``), -log-likelihood of each calibration question's gold answer, averaged."""
    loaded = load_model(str(model_dir), device="cpu")
    split = open_task(str(task_yaml), loaded.tokenizer, seed=0)
    ev = MaskedEvaluator(loaded.model, split.calibration.ids, batch_size=2, utility="task",
                         weights=split.calibration.weights)
    ref = reference_accuracy(loaded.model, loaded.tokenizer, removed)
    by_question = {q: -ref["lls"][i][g] for i, (q, _, g) in enumerate(ITEMS)}
    questions = [loaded.tokenizer.decode(r) for r in split.calibration.ids]
    expected = [next(v for q, v in by_question.items() if f"Question: {q}?" in text) for text in questions]
    mask = masks_from_removed([removed], 4)
    measured = ev.measure(mask)
    np.testing.assert_allclose(measured.nll[0], expected, rtol=1e-4)
    assert ev.loss(mask)[0] == pytest.approx(np.mean(expected), rel=1e-4)
    plain = MaskedEvaluator(loaded.model, split.calibration.ids, batch_size=3, utility="task",
                            weights=split.calibration.weights, prefix_sharing=False)
    np.testing.assert_allclose(plain.measure(mask).nll, measured.nll, rtol=1e-5)


def test_weights_go_with_the_task_utility_only(model_dir):
    loaded = load_model(str(model_dir), device="cpu")
    ids = np.ones((2, 6), dtype=np.int64)
    with pytest.raises(LayershapError, match="give weights"):
        MaskedEvaluator(loaded.model, ids, utility="task")
    with pytest.raises(LayershapError, match="give weights"):
        MaskedEvaluator(loaded.model, ids, weights=np.ones((2, 5)))
    with pytest.raises(LayershapError, match="weights must be"):
        MaskedEvaluator(loaded.model, ids, utility="task", weights=np.ones((2, 6)))


def test_a_task_store_and_a_text_store_refuse_each_other(model_dir, task_yaml, tmp_path):
    util = f"task:{task_yaml}"
    with open_session(model=str(model_dir), text="builtin", masks="loo", out=tmp_path / "t.zarr",
                      utility=util) as s:
        measure_masks(s.evaluator, s.store, s.masks, progress=False)
        task_store, task_ev = s.store.path, s.evaluator
        assert s.store.utility == "task" and s.store.attrs["task"]["name"] == "tiny_mc"
        assert s.store.attrs["text_id"] == "task:tiny_mc" and len(s.store) == 5
    with open_session(model=str(model_dir), text="builtin", masks="loo", out=tmp_path / "n.zarr",
                      windows=2, seq_len=16) as s:
        with pytest.raises(MaskError, match="'nll' rows but the evaluator measures 'task'"):
            measure_masks(task_ev, s.store, s.masks, progress=False)
        text_ev = s.evaluator
    before = len(DatasetStore.open(task_store))
    with pytest.raises(StoreMismatchError, match="utility"):
        open_session(model=str(model_dir), text="builtin", masks="loo", out=task_store, windows=2, seq_len=16)
    with pytest.raises(StoreMismatchError, match="utility"):
        open_session(model=str(model_dir), text="builtin", masks="loo", out=tmp_path / "n.zarr", utility=util)
    stored = DatasetStore.open(task_store)
    with (DatasetStore.create_or_open(task_store, stored.identity, stored.windows) as store,
          pytest.raises(MaskError, match="'task' rows but the evaluator measures 'nll'")):
        measure_masks(text_ev, store, masks_from_removed([(0, 1)], 4), progress=False)
    assert len(DatasetStore.open(task_store)) == before


def test_a_missing_task_file_is_one_line(model_dir, tmp_path, capsys):
    code = main(["plan", "--model", str(model_dir), "--utility", f"task:{tmp_path / 'nope.yaml'}",
                 "--out", str(tmp_path / "p"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "no task YAML there" in err[0]


def test_plan_with_a_task_utility_measures_its_plans_on_the_task(model_dir, task_yaml, tmp_path, capsys):
    out = tmp_path / "plan"
    assert main(["plan", "--model", str(model_dir), "--utility", f"task:{task_yaml}", "--remove", "1,2",
                 "--out", str(out), "--no-progress"]) == 0
    doc = json.loads((out / "plans.json").read_text())
    assert doc["utility"] == "task" and doc["calibration"]["text_id"] == "task:tiny_mc"
    loaded = load_model(str(model_dir), device="cpu")
    store = DatasetStore.open(out / "dataset.zarr")
    calib = {loaded.tokenizer.decode(r) for r in store.windows}
    for p in doc["plans"]:
        ref = reference_accuracy(loaded.model, loaded.tokenizer, p["removed"])
        nll = [-ref["lls"][i][g] for i, (q, _, g) in enumerate(ITEMS) if any(f"Question: {q}?" in t for t in calib)]
        assert p["loss"] == pytest.approx(np.mean(nll), rel=1e-4)
        assert len(p["removed"]) == p["k"]
        # decided on the questions the calibration set left out
        assert p["decision_blocks"] >= 1
    for b in range(len(doc["decision"]["blocks"])):
        block = DatasetStore.open(out / f"decision-{b}.zarr")
        assert block.utility == "task" and not calib & {loaded.tokenizer.decode(r) for r in block.windows}


def test_run_with_a_task_utility_learns_and_scores_the_answer_nll(task_yaml, tmp_path, capsys):
    """``run --utility task:FILE``: every stage works on the task's loss, and the printed tables say it is an
    answer NLL (no perplexity); the surrogate's prediction of the full model is near its measured value."""
    from layershap.surrogate.checkpoint import load_surrogate

    model_dir = save_tiny_model_dir(tmp_path / "m6", "llama", 6, seed=2)
    out = tmp_path / "run"
    assert main(["run", "--model", str(model_dir), "--out", str(out), "--n-masks", "30", "--members", "2",
                 "--hidden", "32", "--remove", "1", "--no-progress", "--no-register",
                 "--utility", f"task:{task_yaml}"]) == 0
    printed = capsys.readouterr().out
    store = DatasetStore.open(out / "dataset.zarr")
    surrogate = load_surrogate(out / "surrogate")
    assert store.utility == "task" and surrogate.utility == "task" and surrogate.offset == 0.0
    assert "answer NLL" in printed and "of -task" in printed and "calib NLL" in printed
    full = store.masks.all(axis=1)
    measured = float(store.loss[full][0])
    assert 0 < measured == pytest.approx(float(np.mean(store.window_loss()[full][0])))
    predicted = float(surrogate.predict(store.masks[full])[0][0])
    assert predicted == pytest.approx(measured, rel=0.5)
    scores = json.loads((out / "scores.json").read_text())
    assert len(scores["scores"]) == 6 and np.isfinite(scores["scores"]).all()
