"""Windows longer than a model's position limit: the evaluator refuses them in one line (GPT-2 and OPT would
otherwise hit a CUDA device-side assert, RoPE models degrade silently), and default window lengths shrink to fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_tokenizer

from layershap.cli.main import main
from layershap.core.errors import LayershapError
from layershap.oracle.evaluate import MaskedEvaluator
from layershap.oracle.positions import fit_seq_len, position_limit


def _model(arch: str, limit: int):
    import transformers as tf

    if arch == "gpt2":
        config = tf.GPT2Config(vocab_size=320, n_layer=2, n_head=2, n_embd=32, n_positions=limit)
    elif arch == "opt":
        config = tf.OPTConfig(vocab_size=320, num_hidden_layers=2, num_attention_heads=2, hidden_size=32, ffn_dim=64,
                              word_embed_proj_dim=32, max_position_embeddings=limit)
    else:
        config = tf.LlamaConfig(vocab_size=320, num_hidden_layers=2, num_attention_heads=2, hidden_size=32,
                                intermediate_size=64, num_key_value_heads=1, max_position_embeddings=limit)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("arch", ["gpt2", "opt", "llama"])
def test_windows_past_the_position_limit_are_refused_in_one_line(arch):
    model = _model(arch, 16)
    assert position_limit(model) == 16
    fits = np.random.default_rng(0).integers(0, 320, size=(2, 16))
    assert np.isfinite(MaskedEvaluator(model, fits).nll(np.ones((1, 2), bool))).all()
    with pytest.raises(LayershapError, match="exceed the 16 positions") as err:
        MaskedEvaluator(model, np.zeros((2, 17), np.int64))
    assert "\n" not in str(err.value) and "at most 15" in str(err.value)


def test_default_lengths_shrink_to_the_limit_with_room_for_bos():
    tokenizer = make_tiny_tokenizer()
    model = _model("gpt2", 32)
    assert fit_seq_len(model, tokenizer, 2048) == 31  # 31 tokens + BOS = 32 positions
    assert fit_seq_len(model, tokenizer, 20) == 20
    assert fit_seq_len(_model("llama", 4096), tokenizer, 2048) == 2048


def test_evaluate_command_fits_its_default_and_refuses_a_given_length(tmp_path, capsys):
    tokenizer = make_tiny_tokenizer()
    model = _model("gpt2", 32)
    model.config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    text = tmp_path / "t.txt"
    from pydoc_data.topics import topics

    text.write_text("\n".join(list(topics.values())[50:60]))
    assert main(["evaluate", "--model", str(tmp_path / "m"), "--text", str(text), "--windows", "2"]) == 0
    assert "2 windows x 31 tokens (+BOS)" in capsys.readouterr().out
    assert main(["evaluate", "--model", str(tmp_path / "m"), "--text", str(text), "--seq-len", "64"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: transformers' weight-loading bar
    assert last.startswith("layershap evaluate: error: ") and "exceed the 32 positions" in last
