"""``layershap compare`` end to end on a tiny random model: table, JSON, PNG, and independent re-computations."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import loss_with_layers_deleted, save_tiny_model_dir
from transformers import AutoTokenizer

from layershap.cli.main import main
from layershap.core.errors import LayershapError
from layershap.pruning.compare import CompareConfig, run_compare

N = 4
SEQ = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("compare")
    keys = sorted(topics)
    (root / "calib.txt").write_text("\n\n".join(topics[k] for k in keys[:12]))
    (root / "eval.txt").write_text("\n\n".join(topics[k] for k in keys[12:24]))
    save_tiny_model_dir(root / "tiny", "llama", N, seed=3)
    return root


def _eval_ids(setup) -> torch.Tensor:
    """The evaluation protocol rebuilt here: consecutive windows from the text start, BOS first."""
    tok = AutoTokenizer.from_pretrained(setup / "tiny")
    stream = tok((setup / "eval.txt").read_text(), add_special_tokens=False)["input_ids"][: 3 * SEQ]
    return torch.cat([torch.full((3, 1), tok.bos_token_id), torch.tensor(stream).reshape(3, SEQ)], dim=1)


def test_compare_end_to_end(setup, capsys):
    out = setup / "out"
    argv = ["compare", "--model", str(setup / "tiny"), "--calib-text", str(setup / "calib.txt"),
            "--eval-text", str(setup / "eval.txt"), "--remove", "1,2", "--windows", "3", "--seq-len", str(SEQ),
            "--eval-windows", "3", "--eval-seq-len", str(SEQ), "--n-masks", "8", "--members", "1", "--seeds", "2", "--top", "2",
            "--device", "cpu", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for name in ("block influence", "angular distance", "leave-one-out", "SLEB", "drop-last", "random",
                 "layershap: lowest scores", "layershap: subset search"):
        assert name in printed
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((out / "compare.json").read_text())
    assert doc["ks"] == [1, 2] and doc["n_layers"] == N
    by = {(r["method"], r["k"], r["seed"]): r for r in doc["results"]}
    assert len(doc["results"]) == 2 * (6 + 2 + 1)  # 6 single baselines/methods + 2 random seeds, x 2 Ks
    # passes: what each method had to measure on the calibration windows
    assert by[("block influence", 2, None)]["oracle_passes"] == 1
    assert by[("leave-one-out", 1, None)]["oracle_passes"] == N + 1
    assert [by[("SLEB", k, None)]["oracle_passes"] for k in (1, 2)] == [N, 2 * N - 1]
    assert by[("drop-last", 2, None)]["removed"] == [2, 3] and by[("drop-last", 2, None)]["oracle_passes"] == 0
    assert doc["layershap"]["built"] is True and doc["layershap"]["rows"] == 8
    assert by[("layershap: lowest scores", 1, None)]["oracle_passes"] == 8
    assert by[("layershap: subset search", 2, None)]["oracle_passes"] == 8 + 2
    # held-out perplexities against HF's own loss on models with the layers deleted
    ids = _eval_ids(setup)
    assert doc["full"]["eval_nll"] == pytest.approx(loss_with_layers_deleted(setup / "tiny", ids, []), abs=1e-5)
    for key in [("drop-last", 2, None), ("layershap: subset search", 2, None), ("random", 1, 1)]:
        r = by[key]
        assert r["eval_nll"] == pytest.approx(loss_with_layers_deleted(setup / "tiny", ids, r["removed"]), abs=1e-5)
        assert r["eval_ppl"] == pytest.approx(np.exp(r["eval_nll"]))
    # the search winner is the best of its re-measured candidates, by calibration nll
    search = by[("layershap: subset search", 2, None)]
    cands = search["extra"]["candidates"]
    assert len(cands) == 2 and search["calib_nll"] == min(c["calib_nll"] for c in cands)
    assert search["extra"]["predicted_calib_nll"] is not None
    assert (out / "scores.json").is_file() and (out / "surrogate" / "metadata.json").is_file()

    # a given surrogate is reused: no store built, its training rows are the passes
    out2 = setup / "out2"
    argv2 = [a if a != str(out) else str(out2) for a in argv] + ["--surrogate", str(out / "surrogate")]
    argv2[argv2.index("--remove") + 1] = "1"
    assert main(argv2) == 0
    doc2 = json.loads((out2 / "compare.json").read_text())
    assert doc2["layershap"]["built"] is False and not (out2 / "dataset.zarr").exists()
    rows = json.loads((out / "surrogate" / "metadata.json").read_text())["split"]["rows"]
    assert {r["oracle_passes"] for r in doc2["results"] if r["method"] == "layershap: lowest scores"} == {rows}

    # a surrogate of another model is refused
    other = setup / "other-surrogate"
    shutil.copytree(out / "surrogate", other)
    meta = json.loads((other / "metadata.json").read_text())
    meta["model_hash"] = "weights-v1:" + "0" * 64  # another model directory
    (other / "metadata.json").write_text(json.dumps(meta))
    argv3 = [a if a != str(out) else str(setup / "out3") for a in argv] + ["--surrogate", str(other)]
    assert main(argv3) == 2
    assert "different models" in capsys.readouterr().err


def test_identical_texts_are_refused(setup, capsys):
    calib = str(setup / "calib.txt")
    copy = setup / "same-content.txt"
    copy.write_text((setup / "calib.txt").read_text())
    with pytest.raises(LayershapError, match="held-out"):
        run_compare(CompareConfig(model=str(setup / "tiny"), calib_text=calib, eval_text=calib, ks=[1],
                                  out=setup / "x", progress=False))
    assert main(["compare", "--model", str(setup / "tiny"), "--calib-text", calib, "--eval-text", str(copy),
                 "--remove", "1", "--out", str(setup / "y")]) == 2
    assert "must be on held-out text" in capsys.readouterr().err
    assert not (setup / "x").exists() and not (setup / "y").exists()
