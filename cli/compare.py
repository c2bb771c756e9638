"""``layershap compare``: layershap vs peer depth-pruning methods, held-out perplexity per method and K
(:func:`layershap.pruning.compare.run_compare`), and with ``--tasks`` zero-shot accuracy through
lm-evaluation-harness (acc, acc_norm and the % of the dense model's accuracy each retains). Writes
``compare.json`` and ``compare.png`` (and, when it builds a surrogate, ``dataset.zarr``, ``surrogate/`` and
``scores.json``) into ``--out``; prints the table.

Example:
    $ layershap compare --model gemma-3-270m --calib-text builtin --eval-text heldout.txt --remove 1,2,3,4
    $ layershap compare --model ./llama --calib-text c4 --eval-text wikitext2 --remove 2,4,8 \\
        --surrogate runs/llama/surrogate --device cuda
    $ layershap compare --model gemma-3-270m --calib-text builtin --eval-text heldout.txt --remove 1,2,3 \
        --tasks pydoc_mc --task-dir benchmarks/tasks --limit 100
"""

from __future__ import annotations

from typing import Literal

from layershap.core.load_options import DEFAULT_LOADING, LoadOptions

from .options import non_negative, positive


def compare(
    model: str,
    calib_text: str,
    eval_text: str,
    remove: list[int],
    windows: int | None = None,
    seq_len: int | None = None,
    eval_windows: int | Literal["all"] | None = None,
    eval_seq_len: int | None = None,
    surrogate: str | None = None,
    n_masks: int | None = None,
    members: int = 8,
    index: Literal["auto", "shapley", "semivalue", "banzhaf"] = "auto",
    top: int = 3,
    beam_width: int = 64,
    seeds: int = 3,
    seed: int = 0,
    loading: LoadOptions = DEFAULT_LOADING,
    batch_size: int | None = None,
    out: str = "runs/compare",
    tasks: str | None = None,
    task_dir: str | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> int:
    """layershap vs peer pruning methods on held-out text.

    Args:
        model: gemma-3-270m (embedded default), a .gguf file, a local model directory or a hub id.
        calib_text: calibration text the methods choose layers on: builtin, .txt/.jsonl, c4, wikitext2.
        eval_text: held-out evaluation text (must differ from --calib-text).
        remove: numbers of layers to remove, e.g. 1,2,3,4.
        windows: calibration windows (default 4 on CPU, 16 on CUDA).
        seq_len: calibration tokens per window (default 128 on CPU, 512 on CUDA).
        eval_windows: consecutive evaluation windows from the start of the text, or all (default 8 on CPU, 32
            on CUDA).
        eval_seq_len: evaluation tokens per window (default 128 on CPU, 1024 on CUDA).
        surrogate: trained surrogate of this model (`layershap train`); default: build one here on the
            calibration windows from --n-masks stratified masks.
        n_masks: stratified masks measured for the surrogate built when --surrogate is not given, full model and
            leave-one-out included (default 64 on CPU, 256 on CUDA).
        members: ensemble size of the surrogate built here.
        index: layer scores for 'layershap: lowest scores' (auto: what the surrogate's data cover).
        top: subset-search candidates re-measured by the oracle per K.
        beam_width: beam width when C(n, K) > 1e6 removal sets.
        seeds: random-removal seeds.
        seed: seed of the calibration windows, the masks and the surrogate training.
        loading: how to load the model (--device, --dtype, --device-map; the same for every command).
        batch_size: windows (text) or requests (tasks) per forward pass (text: 4 on CPU, 8 on CUDA; tasks: 4 on
            CPU, 16 on CUDA).
        out: output folder.
        tasks: also evaluate every pruned model and the dense one on these comma-separated lm-eval tasks
            (zero-shot acc and acc_norm, and the % of dense retained), e.g. piqa,hellaswag or local tasks in
            --task-dir; needs `pip install 'layershap[tasks]'`.
        task_dir: folder of local task files (lm-eval's YAML + JSONL format), searched before lm-eval's
            registry.
        limit: evaluate only the first N documents of each task (default: all).
        progress: show progress bars.
    """
    from pathlib import Path

    from layershap.core.errors import LayershapError
    from layershap.pruning.compare import CompareConfig, run_compare
    from layershap.pruning.compare_report import format_table

    for name, value in (("windows", windows), ("seq_len", seq_len), ("eval_seq_len", eval_seq_len),
                        ("n_masks", n_masks), ("members", members), ("top", top), ("beam_width", beam_width),
                        ("seeds", seeds), ("batch_size", batch_size)):
        positive(name, value)
    if eval_windows != "all":
        positive("eval_windows", eval_windows)
    for k in remove:
        positive("remove", k)
    non_negative("seed", seed)
    positive("limit", limit)
    task_names = [t.strip() for t in (tasks or "").split(",") if t.strip()] or None
    if (task_dir or limit) and not task_names:
        raise LayershapError("--task-dir and --limit belong to --tasks; give --tasks A,B")
    cfg = CompareConfig(
        model=model, calib_text=calib_text, eval_text=eval_text, ks=list(remove), out=Path(out), windows=windows,
        seq_len=seq_len, eval_windows=None if eval_windows == "all" else eval_windows, eval_seq_len=eval_seq_len,
        eval_all_windows=eval_windows == "all", surrogate=surrogate, seeds=seeds, seed=seed, n_masks=n_masks,
        members=members, top=top, beam_width=beam_width, index=index, loading=loading, batch_size=batch_size,
        progress=progress, tasks=task_names, task_dir=task_dir, limit=limit,
    )
    doc = run_compare(cfg)
    print(format_table(doc))
    print(f"wrote {cfg.out / 'compare.json'}, {cfg.out / 'compare.png'}")
    return 0
