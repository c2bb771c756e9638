"""`layershap run --players sublayers` end to end on a tiny random Llama: a 2n-player game from oracle to summary."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from conftest import save_tiny_model_dir
from transformers import AutoModelForCausalLM

from layershap.cli.main import main
from layershap.oracle.store import DatasetStore


def loss_without_sublayers(model_dir, ids, removed: list[int]) -> float:
    """HF's ``labels=`` loss of the saved model with the removed players' modules (2i: attention of layer i,
    2i+1: its MLP) replaced by modules returning zeros."""

    class Zero(torch.nn.Module):
        def __init__(self, attn: bool) -> None:
            super().__init__()
            self.attn = attn

        def forward(self, hidden_states=None, *args, **kwargs):
            zeros = torch.zeros_like(hidden_states)
            return (zeros, None) if self.attn else zeros

    m = copy.deepcopy(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval())
    for p in removed:
        layer = m.model.layers[p // 2]
        if p % 2 == 0:
            layer.self_attn = Zero(True)
        else:
            layer.mlp = Zero(False)
    ids = torch.as_tensor(np.asarray(ids))
    with torch.no_grad():
        return float(m(input_ids=ids, labels=ids, use_cache=False).loss)


def test_run_sublayers_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = save_tiny_model_dir(tmp_path / "tiny", "llama", 4, seed=1)
    out = tmp_path / "run"
    argv = ["run", "--model", str(model_dir), "--out", str(out), "--n-masks", "40", "--windows", "2",
            "--seq-len", "24", "--members", "2", "--hidden", "32", "--no-progress", "--players", "sublayers"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    store = DatasetStore.open(out / "dataset.zarr")
    assert store.game == "sublayers" and store.n_layers == 8 and len(store) >= 40
    assert store.players == ["0.attn", "0.mlp", "1.attn", "1.mlp", "2.attn", "2.mlp", "3.attn", "3.mlp"]
    assert store.identity["layer_types"][1::2] == ["mlp"] * 4
    # stratified over the 8 players: every removal count 1..4 appears, attention and MLP removed alike
    removed = ~store.masks
    assert set(removed.sum(axis=1)) >= {0, 1, 2, 3, 4}
    assert removed[:, 0::2].any() and removed[:, 1::2].any()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["game"] == "sublayers" and len(summary["layers"]) == 8
    windows = store.windows
    # leave-one-out perplexities per sublayer and the full model are the real ones
    for p in (0, 3, 6):
        assert summary["layers"][p]["loo_perplexity"] == pytest.approx(
            math.exp(loss_without_sublayers(model_dir, windows, [p])), rel=1e-5)
    assert summary["full_perplexity"] == pytest.approx(math.exp(loss_without_sublayers(model_dir, windows, [])),
                                                       rel=1e-5)
    # every plan removes K sublayers and its perplexity is that of the model without them
    assert [p["k"] for p in summary["plans"]] == [1, 2]  # 1 .. 30 % of 8 players
    for p in summary["plans"]:
        assert len(p["removed"]) == p["k"]
        assert p["perplexity"] == pytest.approx(math.exp(loss_without_sublayers(model_dir, windows, p["removed"])),
                                                rel=1e-5)
    # each plan reports what it removes: parameters, FLOPs and KV cache of its sublayers, counted on the model
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = model.config
    head = config.hidden_size // config.num_attention_heads
    attn_params = (2 * config.hidden_size * config.hidden_size + 2 * config.hidden_size * config.num_key_value_heads
                   * head + config.hidden_size)  # q, o; k, v; input norm
    mlp_params = 3 * config.hidden_size * config.intermediate_size + config.hidden_size
    total = config.num_hidden_layers * (attn_params + mlp_params)
    kv = 2 * config.num_key_value_heads * head * 4
    for p in summary["plans"]:
        n_attn = sum(1 for i in p["removed"] if i % 2 == 0)
        params = n_attn * attn_params + (len(p["removed"]) - n_attn) * mlp_params
        cost = p["removed_cost"]
        assert cost["parameters"] == params and cost["parameter_share"] == pytest.approx(params / total)
        assert cost["kv_cache_bytes_per_token"] == n_attn * kv and cost["kv_cache_share"] == pytest.approx(n_attn / 4)
        assert cost["flops_per_token"] == 2 * (params - n_attn * config.hidden_size
                                               - (len(p["removed"]) - n_attn) * config.hidden_size)
        assert f"K = {p['k']} removes {params / total:.1%} of the decoder parameters" in printed
    # scores per sublayer; ranks follow them
    order = np.argsort([r["score"] for r in summary["layers"]], kind="stable")
    assert [summary["layers"][i]["rank"] for i in order] == list(range(1, 9))
    # the table shows attention and MLP side by side, one line per decoder layer
    table = printed[printed.index("(attention, MLP)"):]
    assert "MLP" in table.splitlines()[1] and "4 layers x (attention, MLP)" in printed
    line = next(x for x in table.splitlines() if x.split()[:1] == ["2"])
    for p in summary["plans"]:  # the plan table names the sublayers it removes
        assert f"  {p['k']:>3}  [{', '.join(store.players[i] for i in p['removed'])}]" in printed
    assert float(line.split()[1]) == pytest.approx(summary["layers"][4]["score"], abs=1e-4)
    assert float(line.split()[5]) == pytest.approx(summary["layers"][5]["score"], abs=1e-4)

    # layershap info names the removed sublayers of the best and worst masks
    capsys.readouterr()
    assert main(["info", str(out / "dataset.zarr"), "--top", "2"]) == 0
    info_text = capsys.readouterr().out
    worst = int(np.argmax(store.nll))
    assert "removed sublayers" in info_text and "rows per removed-sublayer count:" in info_text
    assert ", ".join(store.players[i] for i in np.flatnonzero(~store.masks[worst])) in info_text
    assert "players          8: 0.attn, 0.mlp, 1.attn, 1.mlp, ..., 3.mlp" in info_text

    # a blocks run into the same store is refused in one line; nothing is written
    rows = len(store)
    capsys.readouterr()
    assert main(["oracle", "--model", str(model_dir), "--out", str(out / "dataset.zarr"), "--masks", "loo",
                 "--windows", "2", "--seq-len", "24", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "game: store has 'sublayers', this run has 'blocks'" in err and len(err.strip().splitlines()) == 1
    assert "Loading weights" not in err  # refused before the model is loaded
    assert len(DatasetStore.open(out / "dataset.zarr")) == rows

    # the verified plan for K = 2 sublayers, pruned and reloaded: the model without them
    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", str(model_dir), "--plans", str(out), "--remove", "2", "--out", str(pruned)]) == 0
    plan = next(p for p in summary["plans"] if p["k"] == 2)
    assert f"removed sublayers {', '.join(store.players[i] for i in plan['removed'])}" in capsys.readouterr().out
    info = json.loads((pruned / "layershap_prune.json").read_text())
    assert info["removed_sublayers"] == [store.players[i] for i in plan["removed"]]
    options = {"trust_remote_code": True} if info["trust_remote_code"] else {}
    reloaded = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32, **options).eval()
    ids = torch.as_tensor(windows)
    with torch.no_grad():
        got = float(reloaded(input_ids=ids, labels=ids, use_cache=False).loss)
    assert got == pytest.approx(loss_without_sublayers(model_dir, windows, plan["removed"]), abs=1e-5)


def test_prune_named_sublayers_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = save_tiny_model_dir(tmp_path / "tiny", "qwen3", 3, seed=4)
    out = tmp_path / "p"
    assert main(["prune", "--model", str(model_dir), "--sublayers", "0.attn,2.mlp", "--out", str(out)]) == 0
    assert "trust_remote_code=True" in capsys.readouterr().out
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=True).eval()
    ids = torch.as_tensor(np.random.default_rng(0).integers(3, 300, (2, 10)))
    with torch.no_grad():
        got = float(reloaded(input_ids=ids, labels=ids, use_cache=False).loss)
    assert got == pytest.approx(loss_without_sublayers(model_dir, ids, [0, 5]), abs=1e-5)
    assert main(["prune", "--model", str(model_dir), "--sublayers", "0.attn,7.mlp", "--out", str(tmp_path / "q")]) == 2
    assert "--sublayers names 7.mlp" in capsys.readouterr().err
    assert main(["prune", "--model", str(model_dir), "--sublayers", "0.attn", "--layers", "1",
                 "--out", str(tmp_path / "r")]) == 2
    assert "give either --sublayers" in capsys.readouterr().err


def test_plan_cli_on_the_sublayer_game(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = save_tiny_model_dir(tmp_path / "tiny", "gemma3", 3, seed=5)
    out = tmp_path / "plan"
    assert main(["plan", "--model", str(model_dir), "--out", str(out), "--remove", "1,2", "--windows", "2",
                 "--seq-len", "16", "--players", "sublayers", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "plans.json").read_text())
    assert doc["game"] == "sublayers" and doc["n_layers"] == 6 and len(doc["players"]) == 6
    windows = DatasetStore.open(out / "dataset.zarr").windows
    for p in doc["plans"]:
        assert len(p["removed"]) == p["k"]
        assert p["loss"] == pytest.approx(loss_without_sublayers(model_dir, windows, p["removed"]), abs=1e-5)
        assert f"[{', '.join(doc['players'][i] for i in p['removed'])}]" in printed
