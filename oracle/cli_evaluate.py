"""``layershap evaluate``: perplexity of a model (e.g. a pruned one) on held-out text, evaluation protocol.

Protocol: consecutive non-overlapping windows from the start of the text, BOS prepended to each window,
perplexity = exp(mean NLL over all predicted tokens).

Example:
    $ layershap evaluate --model pruned/ --text heldout.txt --seq-len 512
    $ layershap evaluate --model gemma-3-270m --text wikitext2 --seq-len 2048 --device cuda
"""

from __future__ import annotations

import argparse
import math
import time

from .cli_oracle import positive_int

# Default tokens per window on CPU and on CUDA.
DEFAULT_SEQ_LEN = {"cpu": 512, "cuda": 2048}


def windows_arg(text: str) -> int | None:
    """argparse type: ``all`` (None) or a whole number >= 1."""
    if text.strip().lower() == "all":
        return None
    return positive_int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="gemma-3-270m (embedded default), a .gguf file, a local model directory or a hub id")
    parser.add_argument("--text", required=True,
                        help="held-out text: wikitext2 (test split; needs `datasets` and the hub), a .txt/.jsonl "
                             "path, c4 or builtin")
    parser.add_argument("--seq-len", type=positive_int, default=None,
                        help="tokens per window, BOS not counted (default 512 on CPU, 2048 on CUDA)")
    parser.add_argument("--windows", type=windows_arg, default=None, metavar="W|all",
                        help="number of consecutive windows from the start of the text (default all)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto = CUDA when available, else CPU (default auto)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="windows per forward pass (default 1 on CPU, 8 on CUDA)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")


def evaluate_perplexity(loaded, text_spec: str, seq_len: int, n_windows: int | None, batch_size: int) -> dict:
    """Evaluation-protocol NLL and perplexity of ``loaded`` (a LoadedModel) on text ``text_spec``.

    Example:
        >>> evaluate_perplexity(load_model("pruned/"), "heldout.txt", 512, None, 1)["perplexity"]
    """
    import numpy as np

    from .evaluate import MaskedEvaluator
    from .text import eval_windows, load_text, windows_sha256

    text = load_text(text_spec)
    windows = eval_windows(loaded.tokenizer, text.text, seq_len, n_windows)
    evaluator = MaskedEvaluator(loaded.model, windows, batch_size=batch_size)
    start = time.perf_counter()
    nll = float(evaluator.nll(np.ones((1, evaluator.n_layers), dtype=bool))[0])
    return {
        "model_id": loaded.model_id,
        "model_hash": loaded.model_hash,
        "n_layers": evaluator.n_layers,
        "text_id": text.text_id,
        "seq_len": seq_len,
        "n_windows": int(windows.shape[0]),
        "n_tokens": int(evaluator.n_tokens),
        "windows_sha256": windows_sha256(windows),
        "nll": nll,
        "perplexity": math.exp(nll),
        "seconds": time.perf_counter() - start,
    }


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .loading import load_model

    loaded = load_model(args.model, device=args.device)
    kind = "cuda" if loaded.device.type == "cuda" else "cpu"
    seq_len = args.seq_len or DEFAULT_SEQ_LEN[kind]
    batch_size = args.batch_size or (8 if kind == "cuda" else 1)
    result = evaluate_perplexity(loaded, args.text, seq_len, args.windows, batch_size)
    print(f"model      {result['model_id']} ({result['n_layers']} layers)")
    print(f"text       {result['text_id']}: {result['n_windows']} windows x {seq_len} tokens (+BOS), "
          f"{result['n_tokens']} predicted tokens")
    print(f"nll        {result['nll']:.6f} nats/token")
    print(f"perplexity {result['perplexity']:.4f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
