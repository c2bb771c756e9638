"""Every command that loads a model takes the same loading options (--device, --dtype, --device-map, one
definition) and hands them to the loader; on a GPU the loader asks from_pretrained to read the weights straight
onto it."""

from __future__ import annotations

import json

import pytest
import torch

from layershap.cli.main import main
from layershap.core.errors import LayershapError
from layershap.oracle import distributed, loading, session
from layershap.pruning import compare

OPTIONS = ["--device", "cpu", "--dtype", "bfloat16", "--device-map", "balanced"]


class Loaded(LayershapError):
    """Raised by the recording loader: the command got as far as loading, with these options."""


def commands(tmp_path) -> dict[str, list[str]]:
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("held-out text that is not the calibration text. " * 40)
    return {
        "run": ["--model", "m", "--out", str(tmp_path / "run")],
        "plan": ["--model", "m", "--out", str(tmp_path / "plan")],
        "oracle": ["--model", "m", "--masks", "loo", "--out", str(tmp_path / "o.zarr")],
        "compare": ["--model", "m", "--calib-text", "builtin", "--eval-text", str(heldout), "--remove", "1",
                    "--out", str(tmp_path / "compare")],
        "evaluate": ["--model", "m", "--text", str(heldout)],
        "sparsify": ["--model", "m", "--sparsity", "0.5", "--allocation", "uniform", "--out", str(tmp_path / "sp")],
        "prune": ["--model", "m", "--layers", "1", "--out", str(tmp_path / "pruned")],
    }


@pytest.fixture
def recorded(monkeypatch) -> list[dict]:
    calls: list[dict] = []

    def record(spec, device="auto", dtype=None, device_map=None):
        calls.append({"spec": spec, "device": device, "dtype": dtype, "device_map": device_map})
        raise Loaded(f"loading {spec}")

    for module in (loading, session, compare):  # the loader, as each command's module names it
        monkeypatch.setattr(module, "load_model", record)
    return calls


@pytest.mark.parametrize("command", ["run", "plan", "oracle", "compare", "evaluate", "sparsify", "prune"])
def test_each_loading_command_passes_the_loading_options_to_the_loader(command, tmp_path, recorded, capsys):
    argv = commands(tmp_path)[command]
    assert main([command, *argv, *OPTIONS]) == 2
    assert "error: loading m" in capsys.readouterr().err
    assert recorded == [{"spec": "m", "device": "cpu", "dtype": "bfloat16", "device_map": "balanced"}]
    recorded.clear()
    assert main([command, *argv]) == 2  # the defaults: auto (prune: cpu), the device's dtype, no device map
    assert recorded == [{"spec": "m", "device": "cpu" if command == "prune" else "auto", "dtype": None,
                         "device_map": None}]


def test_the_options_are_one_definition_in_every_help(capsys):
    for command in ("run", "plan", "oracle", "compare", "evaluate", "sparsify", "prune"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "how to load the model (--device" in text, command
        for flag in ("--device {auto,cpu,cuda}", "--dtype DTYPE", "--device-map DEVICE_MAP"):
            assert flag in text, (command, flag)
        assert "--loading.device" not in text


def test_a_bad_loading_option_is_one_line_naming_the_flag(tmp_path, capsys):
    assert main(["evaluate", "--model", "m", "--text", "builtin", "--device", "gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("layershap evaluate: error: --device:") and "gpu" in err and len(err.splitlines()) == 1
    assert main(["evaluate", "--model", "m", "--text", "builtin", "--dtype=int8"]) == 2
    assert capsys.readouterr().err.startswith("layershap evaluate: error: --dtype:")


def test_oracle_workers_get_the_loading_options(tmp_path, monkeypatch, capsys):
    seen = {}

    class Pool:
        def __init__(self, model, **kwargs):
            seen.update(kwargs, model=model)
            raise Loaded("workers started")

    monkeypatch.setattr(distributed, "connect", lambda address=None: None)
    monkeypatch.setattr(distributed, "RayOracle", Pool)
    argv = ["oracle", "--model", "m", "--masks", "loo", "--out", str(tmp_path / "o.zarr"), "--workers", "2"]
    assert main([*argv, *OPTIONS]) == 2
    assert "workers started" in capsys.readouterr().err
    assert (seen["model"], seen["device"], seen["dtype"], seen["device_map"]) == ("m", "cpu", "bfloat16", "balanced")


def test_on_a_gpu_the_weights_are_read_straight_onto_it(tiny_model_dir, monkeypatch):
    """No device map: from_pretrained gets device_map={"": "cuda:i"} (accelerate places each tensor as it is
    read), not a CPU load followed by .to(); with one, the strategy is passed on."""
    from transformers import AutoModelForCausalLM

    asked = []

    def from_pretrained(*args, **kwargs):
        asked.append(kwargs)
        raise Loaded("from_pretrained")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(loading, "resolve_device", lambda device: torch.device("cuda", 1))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for device_map, placed in ((None, {"": "cuda:1"}), ("auto", "auto")):
        with pytest.raises(Loaded):
            loading.load_model(str(tiny_model_dir), device="cuda", dtype="bfloat16", device_map=device_map)
        assert asked[-1]["device_map"] == placed and asked[-1]["dtype"] == torch.bfloat16
    assert loading._placement(None, torch.device("cpu")) == {}  # on the CPU from_pretrained already is there


def test_the_cpu_load_gives_the_same_model_with_a_dtype_name(tiny_model_dir):
    by_name = loading.load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    by_dtype = loading.load_model(str(tiny_model_dir), device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in by_name.model.parameters()} == {torch.bfloat16}
    assert by_name.model_hash == by_dtype.model_hash and by_name.device == torch.device("cpu")
    with pytest.raises(LayershapError, match="unknown dtype 'int9'"):
        loading.load_model(str(tiny_model_dir), device="cpu", dtype="int9")


def test_a_config_file_carries_the_loading_options(tmp_path, recorded, capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", "m", "--text", "builtin", *OPTIONS, "--print_config"])
    config = tmp_path / "evaluate.yaml"
    config.write_text(capsys.readouterr().out)
    assert "loading:\n  device: cpu\n  dtype: bfloat16\n  device_map: balanced\n" in config.read_text()
    assert main(["evaluate", "--config", str(config)]) == 2
    assert main(["evaluate", "--config", str(config), "--device", "auto"]) == 2  # a flag after the file wins
    assert [(c["device"], c["dtype"], c["device_map"]) for c in recorded] == [
        ("cpu", "bfloat16", "balanced"), ("auto", "bfloat16", "balanced")]


def test_evaluate_and_prune_run_with_a_device_map_on_the_cpu(tiny_model_dir, tmp_path, capsys):
    """The real loader with --device-map auto (accelerate keeps a tiny model on the CPU here): the same
    perplexity as the plain load, and a pruned model that loads with from_pretrained."""
    from transformers import AutoModelForCausalLM

    quick = ["--model", str(tiny_model_dir), "--text", "builtin", "--seq-len", "16", "--windows", "2"]
    results = []
    for extra in ([], ["--device-map", "auto"]):
        assert main(["evaluate", *quick, "--device", "cpu", *extra, "--json", str(tmp_path / "e.json")]) == 0
        results.append(json.loads((tmp_path / "e.json").read_text()))
    assert results[0]["nll"] == pytest.approx(results[1]["nll"], abs=1e-6)
    assert results[0]["model_hash"] == results[1]["model_hash"]
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_model_dir), "--layers", "1", "--device-map", "auto",
                 "--dtype", "bfloat16", "--out", str(out)]) == 0
    pruned = AutoModelForCausalLM.from_pretrained(out)
    assert pruned.config.num_hidden_layers == 3 and pruned.dtype == torch.bfloat16
    capsys.readouterr()
