"""``layershap plan``: verified depth-pruning plans — the best set of K layers to remove for each K, searched with the
oracle in the loop and chosen on validation windows (:mod:`layershap.pruning.plan`).

Works in a run folder (``dataset.zarr`` there is reused and extended: rows already measured are free), writes
``plans.json`` and ``validation.zarr`` beside it and prints the plan table; ``layershap prune --plans FOLDER
--remove K`` writes the pruned model.

Example:
    $ layershap plan                                        # Gemma-3-270M, K = 1..5, into runs/gemma-3-270m
    $ layershap plan --model ./my-llama --text calib.txt --remove 4,8 --plan-budget 150 --out runs/my-llama
"""

from __future__ import annotations

from layershap.core.defaults import CALIBRATION_SEQ_LEN, CALIBRATION_WINDOWS, PLAN_BUDGET
from layershap.core.load_options import DEFAULT_LOADING, LoadOptions

from .options import non_negative, positive


def plan(
    model: str = "gemma-3-270m",
    text: str = "builtin",
    out: str | None = None,
    remove: list[int] | None = None,
    plan_budget: int = PLAN_BUDGET,
    windows: int = CALIBRATION_WINDOWS,
    seq_len: int = CALIBRATION_SEQ_LEN,
    seed: int = 0,
    loading: LoadOptions = DEFAULT_LOADING,
    batch_size: int = 4,
    cache_mb: int | None = None,
    top_validate: int = 3,
    progress: bool = True,
) -> int:
    """Verified depth-pruning plans: best removal sets per K, measured, chosen on validation windows.

    Args:
        model: gemma-3-270m (embedded default), a .gguf file, a local model directory or a hub id.
        text: calibration text: builtin, a .txt/.jsonl path, wikitext2 or c4.
        out: run folder (default runs/<model name>); its dataset.zarr is reused and extended.
        remove: the K values to plan, e.g. 2,4,6 (default 1 .. 30 % of the layers).
        plan_budget: new oracle passes for plan candidates in this call (rows already stored are free).
        windows: token windows per mask (calibration; as many validation windows).
        seq_len: tokens per window.
        seed: seed of windows and the search.
        loading: how to load the model (--device, --dtype, --device-map; the same for every command).
        batch_size: windows per forward pass.
        cache_mb: memory budget (MiB) for cached hidden states of shared layer prefixes (oracle).
        top_validate: measured sets per K compared on the validation windows.
        progress: show progress bars.
    """
    from pathlib import Path

    from layershap.oracle.session import open_session
    from layershap.pipeline.plans import format_plans, run_plans
    from layershap.pipeline.run import default_out

    for name, value in (("windows", windows), ("seq_len", seq_len), ("batch_size", batch_size),
                        ("cache_mb", cache_mb), ("top_validate", top_validate)):
        positive(name, value)
    non_negative("seed", seed)
    non_negative("plan_budget", plan_budget)
    for k in remove or []:
        positive("remove", k)
    folder = Path(out) if out is not None else default_out(model)
    folder.mkdir(parents=True, exist_ok=True)
    with open_session(model=model, text=text, masks="loo", out=folder / "dataset.zarr", windows=windows,
                      seq_len=seq_len, seed=seed, loading=loading, batch_size=batch_size,
                      cache_mb=cache_mb) as session:
        doc = run_plans(session, text=text, out=folder, ks=remove, budget=plan_budget, windows=windows,
                        seq_len=seq_len, seed=seed, batch_size=batch_size, cache_mb=cache_mb,
                        top_validate=top_validate, progress=progress)
    print(format_plans(doc))
    print(f"wrote {folder / 'plans.json'}; prune with `layershap prune --model {model} --plans {folder} "
          f"--remove K --out DIR`")
    return 0
