"""``layershap run``: the main job in one command (:func:`layershap.pipeline.run.run_main_job`).

oracle on stratified masks -> verified plans (screened on the calibration windows, decided on fresh ones) ->
surrogate ensemble -> layer scores -> a table of layer, score ± s.e., rank and leave-one-out perplexity, and the
plans for 10/20/30 % depth reduction with how sure each is. The job's token budget is printed first. Running the
same command again resumes the oracle where it stopped.

Example:
    $ layershap run                                   # Gemma-3-270M on Python's docs, CPU defaults
    $ layershap run --model ./my-llama --text calib.txt --utility kl --out runs/llama
    $ layershap run --utility task:benchmarks/tasks/pydoc_mc.yaml --out runs/gemma-pydoc
    $ layershap run --print_config > run.yaml; layershap run --config run.yaml
    $ layershap run --model ./my-llama --players sublayers      # attention and MLP of each layer as players
"""

from __future__ import annotations

from typing import Literal

from layershap.core.defaults import CALIBRATION_SEQ_LEN, CALIBRATION_WINDOWS
from layershap.core.load_options import DEFAULT_LOADING, LoadOptions

from .options import non_negative, positive


def run(
    model: str = "gemma-3-270m",
    text: str = "builtin",
    out: str | None = None,
    n_masks: int | None = None,
    sampling: Literal["stratified", "stratified-all"] = "stratified",
    active_rows: int | None = None,
    windows: int = CALIBRATION_WINDOWS,
    seq_len: int = CALIBRATION_SEQ_LEN,
    seed: int = 0,
    loading: LoadOptions = DEFAULT_LOADING,
    batch_size: int = 4,
    cache_mb: int | None = None,
    members: int = 8,
    hidden: int = 64,
    remove: list[int] | None = None,
    tokens: int | None = None,
    utility: str = "nll",
    players: Literal["blocks", "sublayers"] = "blocks",
    heal: str | None = None,
    register: bool = True,
    progress: bool = True,
) -> int:
    """Main job: oracle on stratified masks -> verified plans -> surrogate -> layer scores -> summary.

    Args:
        model: gemma-3-270m (embedded default), a .gguf file, a local model directory or a hub id.
        text: calibration text: builtin, a .txt/.jsonl path, wikitext2 or c4.
        out: output folder (default runs/<model name>).
        n_masks: number of stratified oracle masks, including the full model and all leave-one-out masks
            (default: 3 per layer, at least 48).
        sampling: stratified = 1..ceil(n/2) layers removed (pruning range, scores = semivalue over that range);
            stratified-all = every count 1..n (scores = Shapley value).
        active_rows: active sampling: after the initial --n-masks, add masks where the surrogate ensemble
            disagrees until the ranking is stable or the store holds this many rows (before the plans).
        windows: token windows per mask.
        seq_len: tokens per window.
        seed: seed of windows, masks and training.
        loading: how to load the model (--device, --dtype, --device-map; the same for every command).
        batch_size: windows per forward pass.
        cache_mb: memory budget (MiB) for cached hidden states of shared layer prefixes (oracle).
        members: surrogate ensemble size.
        hidden: surrogate hidden units per layer.
        remove: the K values to plan, e.g. 2,4,6 (default 1 .. 30 % of the layers).
        tokens: the job's oracle tokens at most (default: what the depth, K range and device need; less shrinks
            the plan search in proportion).
        utility: what a mask's loss is: nll (token NLL of the text), kl (KL to the dense model's next-token
            distributions) or task:FILE (the NLL of a local multiple-choice task's correct answers; FILE: its
            lm-eval YAML; its questions replace --text, --windows and --seq-len).
        players: blocks = decoder layers; sublayers = each layer's attention and MLP apart (2n players: entry 2i
            is layer i's attention, 2i+1 its MLP; --remove counts sublayers; Llama, Mistral, Qwen 2/3, Gemma 2/3).
        heal: also plan for the healed model: bias, linear or lowrank:R (every candidate measured after its
            training-free recovery, fitted as `layershap heal` does), into OUT/heal-<method>/.
        register: add the trained surrogate to the registry (`layershap registry list`).
        progress: show progress bars.
    """
    from pathlib import Path

    from layershap.oracle.task_utility import parse_utility
    from layershap.pipeline.run import run_main_job

    for name, value in (("n_masks", n_masks), ("active_rows", active_rows), ("windows", windows),
                        ("seq_len", seq_len), ("batch_size", batch_size), ("cache_mb", cache_mb),
                        ("members", members), ("hidden", hidden), ("tokens", tokens)):
        positive(name, value)
    non_negative("seed", seed)
    for k in remove or []:
        positive("remove", k)
    parse_utility(utility)
    if heal is not None:
        from layershap.cli.plan import check_heal

        check_heal(heal, players)
    run_main_job(model=model, text=text, out=None if out is None else Path(out), n_masks=n_masks,
                 sampling=sampling, active_rows=active_rows, windows=windows, seq_len=seq_len, seed=seed,
                 loading=loading, batch_size=batch_size, cache_mb=cache_mb, members=members, hidden=hidden,
                 tokens=tokens, remove=remove, utility=utility, players=players, heal=heal, register=register,
                 progress=progress)
    return 0
