"""`layershap oracle` / `layershap info` on tiny saved models: stored nll vs an independent computation,
resume after SIGKILL, and bad input (exit status 2, clear message, existing store untouched)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_VOCAB, loss_with_layers_deleted, make_tiny_tokenizer, save_tiny_model_dir

from layershap.cli.main import main
from layershap.oracle.store import DatasetStore

QUICK = ["--windows", "2", "--seq-len", "16", "--device", "cpu", "--no-progress"]


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def committed_rows(path: Path) -> int:
    """The committed row count, read straight from the group's zarr.json (0 before the store exists)."""
    try:
        return int(json.loads((path / "zarr.json").read_text())["attributes"]["n_rows"])
    except FileNotFoundError:
        return 0


pytestmark = pytest.mark.usefixtures("one_thread")  # module-scoped: the stores below are built on one thread too


@pytest.fixture(scope="module")
def model6_dir(tmp_path_factory) -> Path:
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama6"), "llama", 6, 0)


@pytest.fixture(scope="module")
def loo_store(tmp_path_factory, tiny_model_dir) -> Path:
    """A store with the loo masks of the 4-layer tiny Llama, made through the CLI entry point."""
    out = tmp_path_factory.mktemp("loo") / "loo.zarr"
    assert main(["oracle", "--model", str(tiny_model_dir), "--masks", "loo", "--out", str(out), *QUICK]) == 0
    return out


def test_loo_matches_deleted_layer_models(loo_store, tiny_model_dir, tiny_tokenizer):
    store = DatasetStore.open(loo_store)
    assert len(store) == 5 and store.n_layers == 4
    assert store.windows.shape == (2, 17) and (store.windows[:, 0] == tiny_tokenizer.bos_token_id).all()
    assert ((store.windows >= 0) & (store.windows < TINY_VOCAB)).all()
    expected_masks = np.vstack([np.ones(4, bool), ~np.eye(4, dtype=bool)])
    assert sorted(m.tobytes() for m in store.masks) == sorted(m.tobytes() for m in expected_masks)
    for mask in expected_masks[[0, 3]]:  # the full model and the model without layer 2
        row = next(i for i, m in enumerate(store.masks) if np.array_equal(m, mask))
        ref = loss_with_layers_deleted(tiny_model_dir, store.windows, np.flatnonzero(~mask))
        np.testing.assert_allclose(store.nll[row], ref, rtol=1e-5)
    assert (store.seconds > 0).all()
    assert len(set(store.nll.round(6))) == 5  # skipping any layer changes the loss of this random model


def test_rerun_adds_nothing(loo_store, tiny_model_dir, capsys):
    before = snapshot(loo_store)
    assert main(["oracle", "--model", str(tiny_model_dir), "--masks", "loo", "--out", str(loo_store), *QUICK]) == 0
    out = capsys.readouterr().out
    assert "added 0 rows; 5 rows" in out and "5 already stored, 0 to measure" in out
    assert snapshot(loo_store) == before


def test_info_lists_rows_and_best_masks(loo_store, capsys):
    store = DatasetStore.open(loo_store)
    assert main(["info", str(loo_store)]) == 0
    out = capsys.readouterr().out
    assert "rows: 5" in out and "n_layers" in out and store.attrs["model_hash"] in out
    best = int(np.argmin(store.nll))
    removed = ", ".join(str(i) for i in np.flatnonzero(~store.masks[best])) or "none"
    lines = out.splitlines()
    first_best = lines[lines.index(next(s for s in lines if s.startswith("best 5 masks"))) + 2]
    assert first_best.split()[0].rstrip(",") == removed.split(",")[0]
    assert f"{store.nll[best]:.4f}" in first_best and f"{np.exp(store.nll[best]):.4g}" in first_best
    assert "rows per removed-layer count" in out
    counts = {int(ln.split()[0]): int(ln.split()[1]) for ln in lines[lines.index("rows per removed-layer count:") + 2:]}
    assert counts == {0: 1, 1: 4}


def write_mask_file(path: Path, masks: np.ndarray) -> Path:
    path.write_text("# resume test masks\n" + "\n".join("".join("1" if b else "0" for b in m) for m in masks) + "\n")
    return path


def test_resume_after_sigkill(tmp_path, model6_dir):
    rng = np.random.default_rng(7)
    codes = rng.choice(2**6, size=20, replace=False)
    masks = ((codes[:, None] >> np.arange(6)) & 1).astype(bool)
    mask_file = write_mask_file(tmp_path / "masks.txt", np.vstack([masks, masks[:3]]))  # repeats are measured once
    args = ["--model", str(model6_dir), "--masks", f"file:{mask_file}", "--windows", "32", "--seq-len", "128",
            "--batch-size", "1", "--device", "cpu", "--no-progress"]
    killed = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "layershap.cli.main", "oracle", *args, "--out", str(killed)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with (tmp_path / "first.log").open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        try:
            while committed_rows(killed) < 3:
                assert proc.poll() is None, f"oracle ended before the kill: {(tmp_path / 'first.log').read_text()}"
                assert time.monotonic() < deadline, "no rows committed within 180 s"
                time.sleep(0.01)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    killed_at = time.monotonic()
    partial = DatasetStore.open(killed)
    k = len(partial)
    assert 3 <= k < 20, f"kill landed after {k} rows; the test needs a run cut short"

    rerun = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    rerun_done = time.monotonic()
    assert rerun.returncode == 0, rerun.stderr
    assert f"{k} already stored, {20 - k} to measure" in rerun.stdout
    final = DatasetStore.open(killed)
    assert len(final) == 20
    assert len({m.tobytes() for m in final.masks}) == 20
    assert {m.tobytes() for m in final.masks} == {m.tobytes() for m in masks}
    # finished rows were kept as they were, not recomputed: same masks, nll and timings in the same places
    np.testing.assert_array_equal(final.masks[:k], partial.masks)
    np.testing.assert_array_equal(final.nll[:k], partial.nll)
    np.testing.assert_array_equal(final.seconds[:k], partial.seconds)

    reference = tmp_path / "reference.zarr"
    assert main(["oracle", *args, "--out", str(reference)]) == 0
    ref = DatasetStore.open(reference)
    print(f"kill after {k} rows; rerun {rerun_done - killed_at:.1f} s; reference {time.monotonic() - rerun_done:.1f} s")
    np.testing.assert_array_equal(ref.windows, final.windows)
    ref_nll = {m.tobytes(): v for m, v in zip(ref.masks, ref.nll)}
    got_nll = {m.tobytes(): v for m, v in zip(final.masks, final.nll)}
    assert ref_nll.keys() == got_nll.keys()
    for key, value in ref_nll.items():
        np.testing.assert_allclose(got_nll[key], value, rtol=1e-6)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny BERT language-model head saved like a checkpoint: a model layershap does not support."""
    from transformers import AutoModelForCausalLM, BertConfig

    config = BertConfig(vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, is_decoder=True)
    path = tmp_path_factory.mktemp("tiny-bert")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


def bad_case(name: str, tmp_path: Path, tiny_model_dir: Path, bert_dir: Path) -> tuple[list[str], str]:
    """Arguments (without --out) and the expected message fragment of one bad-input case."""
    if name == "mask_length":
        f = tmp_path / "short.txt"
        f.write_text("1111\n111\n")
        return ["--model", str(tiny_model_dir), "--masks", f"file:{f}", *QUICK], "line 2: mask has 3 values"
    if name == "not_binary":
        f = tmp_path / "bad.txt"
        f.write_text("1101\n1121\n")
        return ["--model", str(tiny_model_dir), "--masks", f"file:{f}", *QUICK], "contains something other than 0"
    if name == "unsupported_arch":
        return ["--model", str(bert_dir), "--masks", "loo", *QUICK], "Supported model types"
    if name == "other_model":
        other = save_tiny_model_dir(tmp_path / "other-llama", "llama", 4, seed=1)
        return ["--model", str(other), "--masks", "loo", *QUICK], "model_hash: store has"
    if name == "other_seq_len":
        args = ["--model", str(tiny_model_dir), "--masks", "loo", "--windows", "2", "--seq-len", "12",
                "--device", "cpu", "--no-progress"]
        return args, "seq_len: store has 16, this run has 12"
    if name == "unknown_spec":
        return ["--model", str(tiny_model_dir), "--masks", "bogus", *QUICK], "valid forms: loo, stratified"
    if name == "n_masks_with_loo":
        return ["--model", str(tiny_model_dir), "--masks", "loo", "--n-masks", "5", *QUICK], "--n-masks applies"
    raise AssertionError(name)


CASES = ["mask_length", "not_binary", "unsupported_arch", "other_model", "other_seq_len", "n_masks_with_loo",
         "unknown_spec"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_keeps_existing_store(case, tmp_path, loo_store, tiny_model_dir, bert_dir, capsys):
    args, message = bad_case(case, tmp_path, tiny_model_dir, bert_dir)
    before = snapshot(loo_store)
    assert main(["oracle", *args, "--out", str(loo_store)]) == 2
    err = capsys.readouterr().err
    assert "layershap oracle: error:" in err and message in err
    if case in ("other_model", "other_seq_len"):
        assert "use another --out path" in err
    assert snapshot(loo_store) == before
    assert len(DatasetStore.open(loo_store)) == 5


@pytest.mark.parametrize("case", ["mask_length", "not_binary", "other_seq_len", "n_masks_with_loo", "unknown_spec"])
def test_workers_make_the_same_cheap_checks_before_starting_ray(case, tmp_path, loo_store, tiny_model_dir, bert_dir,
                                                                capsys, monkeypatch):
    from layershap.oracle import distributed

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the request was checked")

    monkeypatch.setattr(distributed, "connect", no_ray)
    args, message = bad_case(case, tmp_path, tiny_model_dir, bert_dir)
    before = snapshot(loo_store)
    assert main(["oracle", *args, "--workers", "2", "--out", str(loo_store)]) == 2
    err = capsys.readouterr().err
    assert "layershap oracle: error:" in err and message in err
    assert snapshot(loo_store) == before


@pytest.mark.parametrize("case", ["mask_length", "not_binary", "unsupported_arch", "unknown_spec"])
def test_bad_input_creates_no_store(case, tmp_path, tiny_model_dir, bert_dir, capsys):
    args, message = bad_case(case, tmp_path, tiny_model_dir, bert_dir)
    out = tmp_path / "new.zarr"
    assert main(["oracle", *args, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_not_a_store_and_bad_numbers(tmp_path, tiny_model_dir, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "keep.txt").write_text("mine")
    assert main(["oracle", "--model", str(tiny_model_dir), "--masks", "loo", "--out", str(plain), *QUICK]) == 2
    assert "not a layershap dataset store" in capsys.readouterr().err
    assert [p.name for p in plain.iterdir()] == ["keep.txt"]
    assert main(["info", str(tmp_path / "missing.zarr")]) == 2
    assert "does not exist" in capsys.readouterr().err
    code = main(["oracle", "--model", "x", "--masks", "loo", "--out", str(tmp_path / "o.zarr"), "--windows", "0"])
    assert code == 2 and "must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "o.zarr").exists()


def test_cache_budget_option_gives_the_same_rows(tmp_path, tiny_model_dir):
    """--cache-mb 1 (a tight prefix-cache budget) stores the same nll as the default budget."""
    from layershap.cli.main import main
    from layershap.oracle.store import DatasetStore

    common = ["oracle", "--model", str(tiny_model_dir), "--masks", "loo", "--windows", "2", "--seq-len", "16",
              "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "a.zarr")]) == 0
    assert main([*common, "--out", str(tmp_path / "b.zarr"), "--cache-mb", "1"]) == 0
    a, b = DatasetStore.open(tmp_path / "a.zarr"), DatasetStore.open(tmp_path / "b.zarr")
    order_a = np.lexsort(a.masks.T)
    order_b = np.lexsort(b.masks.T)
    np.testing.assert_array_equal(a.masks[order_a], b.masks[order_b])
    np.testing.assert_allclose(a.nll[order_a], b.nll[order_b], rtol=1e-6)
