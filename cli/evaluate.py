"""``layershap evaluate``: perplexity of a model (e.g. a pruned one) on held-out text, evaluation protocol
(consecutive non-overlapping windows from the start of the text, BOS prepended to each window).

Example:
    $ layershap evaluate --model pruned/ --text heldout.txt --seq-len 512
    $ layershap evaluate --model gemma-3-270m --text wikitext2 --seq-len 2048 --device cuda --json ppl.json
"""

from __future__ import annotations

from typing import Literal

from layershap.core.load_options import DEFAULT_LOADING, LoadOptions

from .options import positive


def evaluate(
    model: str,
    text: str,
    seq_len: int | None = None,
    windows: int | Literal["all"] = "all",
    loading: LoadOptions = DEFAULT_LOADING,
    batch_size: int | None = None,
    json: str | None = None,
) -> int:
    """Perplexity of a model on held-out text.

    Args:
        model: gemma-3-270m (embedded default), a .gguf file, a local model directory (e.g. a pruned one) or a
            hub id.
        text: held-out text: wikitext2 (test split; needs `datasets` and the hub), a .txt/.jsonl path, c4 or
            builtin.
        seq_len: tokens per window, BOS not counted (default 512 on CPU, 2048 on CUDA, shortened to the model's
            position limit).
        windows: number of consecutive windows from the start of the text, or all.
        loading: how to load the model (--device, --dtype, --device-map; the same for every command).
        batch_size: windows per forward pass (default 1 on CPU, 8 on CUDA).
        json: also write the result to this JSON file.
    """
    from layershap.core.jsonio import write_json
    from layershap.oracle.heldout import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN, evaluate_perplexity
    from layershap.oracle.loading import load_model
    from layershap.oracle.positions import fit_seq_len

    positive("seq_len", seq_len)
    positive("batch_size", batch_size)
    n_windows = None if windows == "all" else positive("windows", windows)
    loaded = load_model(model, **loading.as_kwargs())
    kind = "cuda" if loaded.device.type == "cuda" else "cpu"
    seq_len = seq_len or fit_seq_len(loaded.model, loaded.tokenizer, DEFAULT_SEQ_LEN[kind])
    result = evaluate_perplexity(loaded, text, seq_len, n_windows, batch_size or DEFAULT_BATCH_SIZE[kind])
    print(f"model      {result['model_id']} ({result['n_layers']} layers)")
    print(f"text       {result['text_id']}: {result['n_windows']} windows x {seq_len} tokens (+BOS), "
          f"{result['n_tokens']} predicted tokens")
    print(f"nll        {result['nll']:.6f} nats/token")
    print(f"perplexity {result['perplexity']:.4f}")
    if json:
        write_json(json, result)
        print(f"wrote {json}")
    return 0
