"""``layershap evaluate``: a model (e.g. a pruned one) on held-out text (perplexity, evaluation protocol:
consecutive non-overlapping windows from the start of the text, BOS prepended to each window) and/or on
zero-shot tasks through lm-evaluation-harness (acc and acc_norm with standard errors; lm-eval's results file).

Example:
    $ layershap evaluate --model pruned/ --text heldout.txt --seq-len 512
    $ layershap evaluate --model gemma-3-270m --text wikitext2 --seq-len 2048 --device cuda --json ppl.json
    $ layershap evaluate --model gemma-3-270m --tasks pydoc_mc --task-dir benchmarks/tasks --limit 50 \\
        --layers 7,8 --out results.json
"""

from __future__ import annotations

from typing import Literal

from layershap.core.defaults import TASK_SEED
from layershap.core.load_options import DEFAULT_LOADING, LoadOptions

from .options import non_negative, positive


def evaluate(
    model: str,
    text: str | None = None,
    tasks: str | None = None,
    task_dir: str | None = None,
    limit: int | None = None,
    layers: list[int] | None = None,
    seq_len: int | None = None,
    windows: int | Literal["all"] = "all",
    loading: LoadOptions = DEFAULT_LOADING,
    batch_size: int | None = None,
    seed: int = TASK_SEED,
    log_samples: bool = False,
    json: str | None = None,
    out: str | None = None,
) -> int:
    """Perplexity of a model on held-out text, and/or its zero-shot accuracy on lm-eval tasks.

    Args:
        model: gemma-3-270m (embedded default), a .gguf file, a local model directory (e.g. a pruned one) or a
            hub id.
        text: held-out text: wikitext2 (test split; needs `datasets` and the hub), a .txt/.jsonl path, c4 or
            builtin.
        tasks: comma-separated lm-eval tasks, e.g. piqa,hellaswag (their data must be reachable or cached), or
            local tasks in --task-dir; needs `pip install 'layershap[tasks]'`.
        task_dir: folder of local task files (lm-eval's YAML + JSONL format), searched before lm-eval's
            registry.
        limit: evaluate only the first N documents of each task (default: all).
        layers: skip these 0-based decoder layers (in memory, nothing saved), e.g. 7,8.
        seq_len: tokens per window, BOS not counted (default 512 on CPU, 2048 on CUDA, shortened to the model's
            position limit).
        windows: number of consecutive windows from the start of the text, or all.
        loading: how to load the model (--device, --dtype, --device-map; the same for every command).
        batch_size: windows (text) or requests (tasks) per forward pass (text: 1 on CPU, 8 on CUDA; tasks: 4 on
            CPU, 16 on CUDA).
        seed: seed of lm-eval's random generators (Python, numpy, torch, few-shot sampler).
        log_samples: keep lm-eval's per-document samples in the --out file.
        json: write the perplexity result to this JSON file.
        out: write lm-eval's results (the dict simple_evaluate returns) to this JSON file.
    """
    from layershap.core.errors import LayershapError
    from layershap.core.jsonio import write_json
    from layershap.core.masks import masks_from_removed
    from layershap.oracle.layers import find_layers
    from layershap.oracle.loading import load_model
    from layershap.oracle.positions import fit_seq_len

    positive("seq_len", seq_len)
    positive("batch_size", batch_size)
    positive("limit", limit)
    non_negative("seed", seed)
    n_windows = None if windows == "all" else positive("windows", windows)
    task_names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    if text is None and not task_names:
        raise LayershapError("say what to evaluate on: --text T (held-out perplexity) and/or --tasks A,B "
                             "(zero-shot accuracy)")
    if (task_dir or limit or out or log_samples) and not task_names:
        raise LayershapError("--task-dir, --limit, --out and --log-samples belong to --tasks; give --tasks A,B")
    if json and text is None:
        raise LayershapError("--json writes the perplexity result; give --text, or use --out for --tasks")
    if layers is not None and not layers:
        raise LayershapError("--layers names no layer; give 0-based indices like --layers 7,8")
    zeroshot = None
    if task_names:  # load the tasks before the model: a missing task fails fast
        from layershap.oracle.zeroshot import ZeroShot, format_accuracy

        zeroshot = ZeroShot(task_names, task_dir=task_dir, limit=limit, batch_size=batch_size, seed=seed,
                            log_samples=log_samples)
    loaded = load_model(model, **loading.as_kwargs())
    kind = "cuda" if loaded.device.type == "cuda" else "cpu"
    n = find_layers(loaded.model).n_layers
    mask = masks_from_removed(sorted(layers), n)[0] if layers else None
    print(f"model      {loaded.model_id} ({n} layers" + (f", layers {sorted(layers)} skipped)" if layers else ")"))
    if text is not None:
        from layershap.oracle.heldout import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN, evaluate_perplexity

        seq_len = seq_len or fit_seq_len(loaded.model, loaded.tokenizer, DEFAULT_SEQ_LEN[kind])
        result = evaluate_perplexity(loaded, text, seq_len, n_windows, batch_size or DEFAULT_BATCH_SIZE[kind], mask)
        print(f"text       {result['text_id']}: {result['n_windows']} windows x {seq_len} tokens (+BOS), "
              f"{result['n_tokens']} predicted tokens")
        print(f"nll        {result['nll']:.6f} nats/token")
        print(f"perplexity {result['perplexity']:.4f}")
        if json:
            write_json(json, result)
            print(f"wrote {json}")
    if zeroshot is not None:
        results = zeroshot.evaluate(loaded.model, loaded.tokenizer, mask,
                                    info={"model_id": loaded.model_id, "model_hash": loaded.model_hash})
        print(format_accuracy(results))
        if out:
            write_json(out, results)
            print(f"wrote {out}")
    return 0
