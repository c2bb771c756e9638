"""``layershap heal`` and ``layershap prune --heal``: the saved healed model equals the library's healing fitted
on the same calibration windows, reloads through ``layershap evaluate``, and bad input fails in one line."""

from __future__ import annotations

import copy
import json

import torch
from conftest import save_tiny_model_dir
from transformers import AutoModelForCausalLM

from layershap.cli.main import main
from layershap.oracle.loading import load_model
from layershap.oracle.prune import PRUNE_INFO_FILE, remote_code_option
from layershap.oracle.text import load_text, make_windows
from layershap.pruning.heal import apply_healing, fit_healing


def _ids() -> torch.Tensor:
    return torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(3))


def test_heal_cli_writes_the_library_healing(tmp_path, capsys, one_thread):
    src = save_tiny_model_dir(tmp_path / "tiny", "gemma3", 5, seed=2)
    out = tmp_path / "healed"
    args = ["--model", str(src), "--layers", "2,3", "--windows", "6", "--seq-len", "40", "--no-progress"]
    assert main(["heal", *args, "--method", "lowrank:4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "healed with lowrank:4 on 240 calibration tokens" in printed and "removed layers [2, 3]" in printed
    info = json.loads((out / PRUNE_INFO_FILE).read_text())
    assert info["healing"]["saved_form"] == "custom code" and info["trust_remote_code"] is True
    assert info["healing"]["calibration"]["windows"] == 6
    lm = load_model(str(src), device="cpu")
    windows = make_windows(lm.tokenizer, load_text("builtin").text, 6, 40, seed=0)
    expected_model = apply_healing(copy.deepcopy(lm.model), fit_healing(lm.model, windows, [2, 3], "lowrank:4",
                                                                        progress=False))
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **remote_code_option(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=_ids()).logits, expected_model(input_ids=_ids()).logits,
                                   rtol=0, atol=1e-5)
    assert main(["evaluate", "--model", str(out), "--text", "builtin", "--seq-len", "16", "--windows", "2"]) == 0
    assert "perplexity" in capsys.readouterr().out

    # prune --heal linear on a Llama: the fused, standard folder
    llama = save_tiny_model_dir(tmp_path / "llama", "llama", 4, seed=1)
    assert main(["prune", "--model", str(llama), "--layers", "2", "--heal", "linear", "--windows", "4",
                 "--seq-len", "16", "--no-progress", "--out", str(tmp_path / "fused")]) == 0
    assert "auto_map" not in json.loads((tmp_path / "fused" / "config.json").read_text())
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "fused").config.num_hidden_layers == 3

    # distill: merged into standard weights, the KL it reached recorded
    assert main(["heal", "--model", str(src), "--layers", "2,3", "--method", "distill", "--steps", "8", "--lr",
                 "1e-2", "--windows", "4", "--seq-len", "16", "--no-progress", "--out", str(tmp_path / "d")]) == 0
    assert "distilled 8 steps on 68 calibration tokens" in capsys.readouterr().out
    info = json.loads((tmp_path / "d" / PRUNE_INFO_FILE).read_text())
    assert info["healing"]["saved_form"] == "merged" and info["healing"]["kl_after"] < info["healing"]["kl_before"]
    assert "auto_map" not in json.loads((tmp_path / "d" / "config.json").read_text())


def test_heal_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys, one_thread):
    src = save_tiny_model_dir(tmp_path / "tiny", "llama", 4, seed=0)
    out = tmp_path / "h"
    cases = [
        (["--layers", "0,1", "--method", "bias"], "keep layer 0"),
        (["--layers", "2", "--method", "quadratic"], "use bias, linear, lowrank:R"),
        (["--layers", "2", "--method", "linear", "--windows", "1", "--seq-len", "8"],
         "8 calibration tokens cannot determine a 32 x 32 linear map"),
        (["--layers", "2", "--method", "lowrank:40"], "below the hidden size 32"),
        (["--layers", "2", "--ridge", "-1"], "--ridge must be 0 or more"),
    ]
    for extra, message in cases:
        assert main(["heal", "--model", str(src), "--out", str(out), "--no-progress", *extra]) == 2
        err = capsys.readouterr().err  # (loading progress bars come before the error line)
        last = err.strip().splitlines()[-1]
        assert last.startswith("layershap heal: error: ") and message in last and "Traceback" not in err, err
        assert not out.exists()
