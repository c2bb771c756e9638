"""``layershap plan``: verified depth-pruning plans — the best set of K layers to remove for each K, searched with the
oracle in the loop on the calibration windows and decided on blocks of fresh windows (:mod:`layershap.pruning.plan`).

Works in a run folder (``dataset.zarr`` there is reused and extended: rows already measured are free, and the
passes an earlier plan stage spent are counted), writes ``plans.json`` and ``decision-<b>.zarr`` beside it and
prints the plan table with how sure each choice is; ``layershap prune --plans FOLDER --remove K`` writes the
pruned model.

Example:
    $ layershap plan                                        # Gemma-3-270M, K = 1..5, into runs/gemma-3-270m
    $ layershap plan --model ./my-llama --text calib.txt --remove 4,8 --tokens 400000 --out runs/my-llama
    $ layershap plan --model ./my-llama --players sublayers --remove 4,8 --out runs/my-llama-sub
    $ layershap plan --utility task:benchmarks/tasks/pydoc_mc.yaml --remove 1,2,3,4 --out runs/gemma-pydoc
"""

from __future__ import annotations

from typing import Literal

from layershap.core.defaults import CALIBRATION_SEQ_LEN, CALIBRATION_WINDOWS
from layershap.core.errors import LayershapError
from layershap.core.load_options import DEFAULT_LOADING, LoadOptions

from .options import non_negative, positive


def plan(
    model: str = "gemma-3-270m",
    text: str = "builtin",
    out: str | None = None,
    remove: list[int] | None = None,
    tokens: int | None = None,
    utility: str = "nll",
    windows: int = CALIBRATION_WINDOWS,
    seq_len: int = CALIBRATION_SEQ_LEN,
    seed: int = 0,
    loading: LoadOptions = DEFAULT_LOADING,
    batch_size: int = 4,
    cache_mb: int | None = None,
    progress: bool = True,
    players: Literal["blocks", "sublayers"] = "blocks",
    heal: str | None = None,
) -> int:
    """Verified depth-pruning plans: best removal sets per K, measured, decided on fresh windows.

    Args:
        model: gemma-3-270m (embedded default), a .gguf file, a local model directory or a hub id.
        text: calibration text: builtin, a .txt/.jsonl path, wikitext2 or c4.
        out: run folder (default runs/<model name>); its dataset.zarr is reused and extended.
        remove: the K values to plan, e.g. 2,4,6 (default 1 .. 30 % of the layers).
        tokens: oracle tokens of the search at most (default: what the depth, K range and device need).
        utility: what a mask's loss is: nll (token NLL of the text), kl (KL to the dense model) or task:FILE
            (the NLL of a local multiple-choice task's correct answers; FILE: its lm-eval YAML; its questions
            replace --text, --windows and --seq-len); a folder's stores keep the utility they were made with.
        windows: token windows per mask (calibration, the screening fidelity).
        seq_len: tokens per window.
        seed: seed of windows and the search.
        loading: how to load the model (--device, --dtype, --device-map; the same for every command).
        batch_size: windows per forward pass.
        cache_mb: memory budget (MiB) for cached hidden states of shared layer prefixes (oracle).
        progress: show progress bars.
        players: blocks = decoder layers; sublayers = each layer's attention and MLP apart (K counts sublayers).
        heal: also plan for the healed model: bias, linear or lowrank:R (every candidate measured after its
            training-free recovery, fitted as `layershap heal` does), into OUT/heal-<method>/ beside the unhealed
            plans.
    """
    from pathlib import Path

    from layershap.oracle.session import open_session
    from layershap.oracle.task_utility import parse_utility
    from layershap.pipeline.plans import format_plans, run_plans
    from layershap.pipeline.run import default_out

    for name, value in (("windows", windows), ("seq_len", seq_len), ("batch_size", batch_size),
                        ("cache_mb", cache_mb), ("tokens", tokens)):
        positive(name, value)
    non_negative("seed", seed)
    for k in remove or []:
        positive("remove", k)
    parse_utility(utility)
    if heal is not None:
        check_heal(heal, players)
    folder = Path(out) if out is not None else default_out(model)
    folder.mkdir(parents=True, exist_ok=True)
    with open_session(model=model, text=text, masks="loo", out=folder / "dataset.zarr", windows=windows,
                      seq_len=seq_len, seed=seed, loading=loading, batch_size=batch_size, cache_mb=cache_mb,
                      utility=utility, players=players) as session:
        doc = run_plans(session, text=text, out=folder, ks=remove, total_tokens=tokens, seed=seed,
                        batch_size=batch_size, cache_mb=cache_mb, progress=progress)
        print(format_plans(doc, names=doc.get("players")))
        if heal is not None:
            from layershap.pipeline.heal_plans import format_healed, heal_folder, run_healed_plans

            healed = run_healed_plans(session, text=text, method=heal, out=folder, ks=remove, total_tokens=tokens,
                                      seed=seed, batch_size=batch_size, cache_mb=cache_mb, progress=progress)
            print(format_healed(healed))
            print(f"wrote {heal_folder(folder, heal) / 'plans.json'}; heal one with `layershap heal --model "
                  f"{model} --plans {heal_folder(folder, heal)} --remove K --method {heal} --out DIR`")
    print(f"wrote {folder / 'plans.json'}; prune with `layershap prune --model {model} --plans {folder} "
          f"--remove K --out DIR`")
    return 0


def check_heal(heal: str, players: str) -> None:
    """A ``--heal`` method heal-aware plans can use (before any model is loaded), else one line."""
    from layershap.pruning.heal import parse_method

    if parse_method(heal)[0] == "distill":
        raise LayershapError("--heal distill trains for minutes per set; heal-aware plans use bias, linear or "
                             "lowrank:R (distill the chosen plan afterwards with layershap heal)")
    if players != "blocks":
        raise LayershapError("heal-aware plans work on whole blocks; drop --heal for --players sublayers")
