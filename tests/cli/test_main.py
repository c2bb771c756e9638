"""The ``layershap`` dispatcher: argv normalisation, config files, and one-line errors for bad input in every
command (bad numbers, a file named .gguf that is not GGUF, a store too small to validate a surrogate)."""

from __future__ import annotations

import inspect
import re
import typing

import numpy as np
import pytest

from layershap.cli.main import ALIASES, COMMANDS, command_function, main, normalize_argv
from layershap.oracle.store import DatasetStore
from layershap.oracle.text import windows_sha256
from layershap.sampling.stratified import loo_masks


def test_normalize_argv_dashes_booleans_lists_positionals_aliases():
    run = command_function("run")
    assert normalize_argv("run", run, ["--n-masks", "64", "--no-progress", "--seq-len=32"]) == [
        "--n_masks=64", "--progress=false", "--seq_len=32"]
    shapley = command_function("shapley")
    assert normalize_argv("shapley", shapley, ["dir", "--interactions", "--mc-evals", "9"]) == [
        "--interactions=true", "--mc_evals=9", "--surrogate_dir", "dir"]
    assert normalize_argv("shapley", shapley, ["--interactions", "false", "dir"]) == [
        "--interactions=false", "--surrogate_dir", "dir"]
    compare = command_function("compare")
    assert normalize_argv("compare", compare, ["--remove", "1,2, 4", "--eval-windows", "all"]) == [
        "--remove=[1,2,4]", "--eval_windows=all"]
    export = command_function("export")
    assert normalize_argv("export", export, ["s.json", "--lambda", "0.1", "--config", "c.yaml"]) == [
        "--lam=0.1", "--config=c.yaml", "--scores", "s.json"]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_spells_flags_as_users_type_them(command, capsys):
    """Every parameter of the command's function appears in its help with dashes; true/false flags as
    --X/--no-X; no underscore spelling is left."""
    fn = command_function(command)
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert not re.findall(r"--\w*_\w*", text)
    hints = typing.get_type_hints(fn)
    for name in inspect.signature(fn).parameters:
        flag = "--" + ALIASES.get(command, {}).get(name, name).replace("_", "-")
        if bool in {hints[name], *typing.get_args(hints[name])}:
            assert f"{flag}/--no-{flag[2:]}" in text
        else:
            assert re.search(re.escape(flag) + r"\b", text), flag


def test_print_config_and_config_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--n-masks", "7", "--no-progress", "--print_config"])
    assert info.value.code == 0
    printed = capsys.readouterr().out
    assert "n_masks: 7" in printed and "progress: false" in printed and "members: 8" in printed
    config = tmp_path / "info.yaml"
    config.write_text(f"store: {tmp_path / 'from-config.zarr'}\ntop: 2\n")
    assert main(["info", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("layershap info: error: ") and "from-config.zarr" in err and err.count("\n") == 1


BAD_NUMBERS = {
    "run": (["--n-masks", "0"], "--n-masks must be at least 1"),
    "oracle": (["--model", "m", "--masks", "loo", "--out", "{tmp}/o.zarr", "--windows", "0"], "--windows must be"),
    "info": (["{tmp}/s.zarr", "--top", "-1"], "--top must be 0 or more"),
    "train": (["{tmp}/s.zarr", "--out", "{tmp}/sur", "--members", "0"], "--members must be at least 1"),
    "shapley": (["{tmp}/sur", "--mc-evals", "0"], "--mc-evals must be at least 1"),
    "prune": (["--model", "m", "--out", "{tmp}/p", "--layers", "1", "--remove", "0"], "--remove must be"),
    "evaluate": (["--model", "m", "--text", "builtin", "--seq-len", "0"], "--seq-len must be at least 1"),
    "compare": (["--model", "m", "--calib-text", "a", "--eval-text", "b", "--remove", "1", "--top", "0"],
                "--top must be at least 1"),
    "export": (["{tmp}/s.json", "--sparsity", "0.5", "--lambda", "-1"], "--lambda must be 0 or more"),
}


@pytest.mark.parametrize("command", sorted(BAD_NUMBERS))
def test_every_command_refuses_a_bad_number_in_one_line(command, tmp_path, capsys):
    args, message = BAD_NUMBERS[command]
    assert main([command, *(a.replace("{tmp}", str(tmp_path)) for a in args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"layershap {command}: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_not_a_number_is_one_line(capsys):
    assert main(["run", "--windows", "four"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("layershap run: error: --windows") and err.count("\n") == 1


def test_file_named_gguf_that_is_not_gguf(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"this is not a model\n" * 10)
    assert main(["evaluate", "--model", str(fake), "--text", "builtin"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("layershap evaluate: error: ") and "not a GGUF file" in err and err.count("\n") == 1
    out = tmp_path / "o.zarr"
    assert main(["oracle", "--model", str(fake), "--masks", "loo", "--out", str(out), "--no-progress"]) == 2
    assert "not a GGUF file" in capsys.readouterr().err and not out.exists()
    assert fake.read_bytes() == b"this is not a model\n" * 10


def test_train_on_a_store_too_small_to_validate(tmp_path, capsys):
    n = 5
    windows = np.arange(2 * 9, dtype=np.int64).reshape(2, 9)
    identity = {"model_id": "tiny", "model_hash": "h", "n_layers": n, "layer_types": ["full_attention"] * n,
                "text_id": "builtin", "windows_sha256": windows_sha256(windows), "n_windows": 2, "seq_len": 8,
                "dtype": "float32"}
    store = DatasetStore.create_or_open(tmp_path / "s.zarr", identity, windows)
    masks = loo_masks(n)  # 6 rows: the full model and 5 leave-one-out masks, fewer than 8 cross-validation folds
    store.append(masks, np.linspace(2.0, 3.0, len(masks)), np.full(len(masks), 0.1))
    out = tmp_path / "sur"
    assert main(["train", str(tmp_path / "s.zarr"), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("layershap train: error: only 6 measured masks") and "measure more masks" in err
    assert err.count("\n") == 1 and not out.exists()
    assert len(DatasetStore.open(tmp_path / "s.zarr")) == 6  # the store is untouched
