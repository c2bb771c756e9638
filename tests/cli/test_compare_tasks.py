"""``layershap compare --tasks`` end to end on a tiny random model and a tiny local task: accuracy of the dense
model and of every method's choice against plain forward passes, and the % of dense retained."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import save_tiny_model_dir
from transformers import AutoModelForCausalLM, AutoTokenizer
from zeroshot_support import TASK, reference_accuracy, write_task

from layershap.cli.main import main

N = 4


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path_factory, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-datasets")))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def test_compare_with_tasks(tmp_path, capsys, one_thread):
    from pydoc_data.topics import topics

    keys = sorted(topics)
    (tmp_path / "calib.txt").write_text("\n\n".join(topics[k] for k in keys[:12]))
    (tmp_path / "eval.txt").write_text("\n\n".join(topics[k] for k in keys[12:24]))
    model_dir = save_tiny_model_dir(tmp_path / "tiny", "llama", N, seed=3)
    write_task(tmp_path / "tasks")
    out = tmp_path / "out"
    argv = ["compare", "--model", str(model_dir), "--calib-text", str(tmp_path / "calib.txt"),
            "--eval-text", str(tmp_path / "eval.txt"), "--remove", "1,2", "--windows", "2", "--seq-len", "16",
            "--eval-windows", "2", "--eval-seq-len", "16", "--n-masks", "8", "--members", "1", "--seeds", "2",
            "--top", "2", "--device", "cpu", "--out", str(out), "--no-progress",
            "--tasks", TASK, "--task-dir", str(tmp_path / "tasks"), "--limit", "10"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "compare.json").read_text())
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the first 10 documents, through plain forward passes of copies with the layers deleted
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)

    def ref(removed):
        r = reference_accuracy(model, tok, removed, limit=10)
        return {m: r[m] for m in ("acc", "acc_norm")}

    assert doc["tasks"]["names"] == [TASK] and doc["tasks"]["limit"] == 10
    dense = doc["full"]["tasks"][TASK]
    assert dense["n"] == 10
    assert {m: dense[m] for m in ("acc", "acc_norm")} == pytest.approx(ref([]), abs=1e-12)
    assert dense["acc_retained_pct"] == pytest.approx(100.0) or dense["acc"] == 0
    by = {(r["method"], r["k"], r["seed"]): r for r in doc["results"]}
    for key in [("drop-last", 2, None), ("layershap: subset search", 2, None), ("random", 1, 1), ("SLEB", 1, None)]:
        got = by[key]["tasks"][TASK]
        assert {m: got[m] for m in ("acc", "acc_norm")} == pytest.approx(ref(by[key]["removed"]), abs=1e-12), key
        for m in ("acc", "acc_norm"):
            expect = None if not dense[m] else 100.0 * got[m] / dense[m]
            assert got[f"{m}_retained_pct"] == pytest.approx(expect)
    # the table: a block per metric, the random rows the mean over seeds
    assert f"{TASK} acc: dense model {100 * dense['acc']:.1f}" in printed
    assert f"{TASK} acc_norm: dense model {100 * dense['acc_norm']:.1f}" in printed
    drop = by[("drop-last", 2, None)]["tasks"][TASK]
    acc_block = printed.split(f"{TASK} acc:")[1].split(f"{TASK} acc_norm:")[0]
    row = next(line for line in acc_block.splitlines() if line.startswith("drop-last"))
    retained = "-" if drop["acc_retained_pct"] is None else f"{drop['acc_retained_pct']:.0f}%"
    assert row.split()[-1] == f"({retained})" and row.split()[-2] == f"{100 * drop['acc']:.1f}"
    rand = [by[("random", 2, s)]["tasks"][TASK]["acc"] for s in (0, 1)]
    rand_row = next(line for line in acc_block.splitlines() if line.startswith("random"))
    assert rand_row.split()[-2] == f"{100 * np.mean(rand):.1f}"
