"""A tiny local multiple-choice task in lm-eval's format, and the reference its accuracy is checked against: each
choice's log-likelihood from a plain forward pass of a copy of the model with the layers deleted, argmax."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch

TASK = "tiny_mc"
# question, choices, gold: answers of different lengths, so acc (sum of log-probs) and acc_norm (per character) differ
ITEMS = [
    ("What does len return for an empty list", ["zero", "one", "an error", "None at all"], 0),
    ("Which keyword starts a function definition", ["class", "def", "lambda", "import"], 1),
    ("Which type holds key value pairs", ["list", "tuple", "dict", "a frozen set of pairs"], 2),
    ("What is the result of 3 // 2", ["1.5", "2", "0", "1"], 3),
    ("Which statement leaves a loop early", ["continue", "pass", "break", "return None"], 2),
    ("Which built-in makes a string from an object", ["str", "repr of the object", "int", "chr"], 0),
    ("How are blocks of code delimited", ["braces", "indentation", "begin and end keywords", "semicolons"], 1),
    ("Which value is falsy", ["1", "'a'", "[0]", "0"], 3),
    ("What does append add to a list", ["one element at the end", "a copy", "nothing", "a new list"], 0),
    ("Which module handles regular expressions", ["os", "re", "sys", "json"], 1),
    ("What does None mean", ["no value", "zero", "false", "an empty string of length zero"], 0),
    ("Which operator tests identity", ["==", "is", "in", "not"], 1),
]


def write_task(folder: Path, name: str = TASK, data: str = "items.jsonl") -> Path:
    """``folder/<name>.yaml`` + ``folder/<data>`` (relative ``data_files``, as people write them)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / data).write_text("".join(json.dumps({"question": q, "choices": c, "answer": g}) + "\n"
                                       for q, c, g in ITEMS))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}?\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def reference_pairs(tokenizer) -> list[tuple[list[list[int]], list[list[int]], int, list[int]]]:
    """Per item, written out here: contexts and continuations (token ids), gold, choice lengths in characters.

    The request is ("Question: q?\\nAnswer:", " " + choice); the continuation's tokens are what encoding the whole
    string adds after the context's own tokens (the tokenizer's own special tokens, as lm-eval's HFLM does)."""
    out = []
    for q, choices, gold in ITEMS:
        context = f"Question: {q}?\nAnswer:"
        ctx = tokenizer.encode(context)
        conts = [tokenizer.encode(context + " " + c)[len(ctx):] for c in choices]
        out.append(([ctx] * len(choices), conts, gold, [len(c) for c in choices]))
    return out


def _deleted(model: torch.nn.Module, removed) -> torch.nn.Module:
    m = copy.deepcopy(model)
    gone = {int(i) for i in removed}
    config = m.config.get_text_config() if hasattr(m.config, "get_text_config") else m.config
    layers = m.model.layers
    m.model.layers = torch.nn.ModuleList([layer for i, layer in enumerate(layers) if i not in gone])
    config.num_hidden_layers = len(m.model.layers)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in gone]
    return m.eval()


def reference_accuracy(model: torch.nn.Module, tokenizer, removed=(), limit: int | None = None) -> dict:
    """acc, acc_norm and every choice's log-likelihood of ``model`` with ``removed`` layers deleted (a copy), on
    the first ``limit`` items: one plain forward pass per choice, sum of log-softmax over the continuation."""
    m = _deleted(model, removed)
    lls, acc, acc_norm = [], [], []
    with torch.no_grad():
        for contexts, conts, gold, chars in reference_pairs(tokenizer)[:limit]:
            row = []
            for ctx, cont in zip(contexts, conts):
                ids = torch.tensor([ctx + cont])
                logp = torch.log_softmax(m(input_ids=ids, use_cache=False).logits[0].double(), -1)
                row.append(float(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont))))
            lls.append(row)
            acc.append(float(np.argmax(row) == gold))
            acc_norm.append(float(np.argmax(np.array(row) / np.array(chars)) == gold))
    n = len(acc)
    return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm)), "lls": lls,
            "acc_stderr": float(np.std(acc, ddof=1) / np.sqrt(n)),
            "acc_norm_stderr": float(np.std(acc_norm, ddof=1) / np.sqrt(n))}
