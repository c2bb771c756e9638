"""The main job as library calls: oracle on stratified masks -> verified depth-pruning plans (search with the oracle
in the loop, chosen on validation windows) -> surrogate ensemble on every row (kept in memory) -> layer scores
(the index the data support) -> summary: a table of layer, score ± s.e., rank and leave-one-out perplexity, and
the plans for K = 1 .. 30 % of the layers. Everything goes into one folder; running the same job again resumes
and never measures a mask twice. The trained surrogate is added to the registry (``layershap registry``).

Example:
    >>> summary = run_main_job(model="gemma-3-270m", out=Path("runs/gemma-3-270m"))
    >>> summary["suggestions"][0]["layers"]
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from layershap.core.defaults import CALIBRATION_SEQ_LEN, CALIBRATION_WINDOWS, MAIN_JOB_MASKS, PLAN_BUDGET
from layershap.core.jsonio import write_json, write_text_atomic
from layershap.core.load_options import DEFAULT_LOADING, LoadOptions
from layershap.oracle.measure import measure_masks
from layershap.oracle.session import open_session
from layershap.oracle.store import DatasetStore
from layershap.shapley.scores_io import ScoresRecord
from layershap.surrogate.metrics import training_report
from layershap.surrogate.network import DEFAULT_HIDDEN
from layershap.surrogate.train import train_surrogate

from .active import run_active_sampling
from .plans import DEPTH_REDUCTIONS, PLANS_FILE, format_plans, run_plans
from .scores import score_surrogate


def default_out(model: str) -> Path:
    """``runs/<model name>``: the main job's folder when none is given.

    Example:
        >>> default_out("./models/my-llama.gguf")
        PosixPath('runs/my-llama')
    """
    return Path("runs") / Path(model).name.replace(".gguf", "")


def _heading(text: str) -> None:
    print(f"\n== {text} ==", flush=True)


def run_main_job(
    *,
    model: str = "gemma-3-270m",
    text: str = "builtin",
    out: Path | None = None,
    n_masks: int = MAIN_JOB_MASKS,
    sampling: str = "stratified",
    budget: int | None = None,
    windows: int = CALIBRATION_WINDOWS,
    seq_len: int = CALIBRATION_SEQ_LEN,
    seed: int = 0,
    loading: LoadOptions = DEFAULT_LOADING,
    batch_size: int = 4,
    cache_mb: int | None = None,
    members: int = 8,
    hidden: int = DEFAULT_HIDDEN,
    plan_budget: int = PLAN_BUDGET,
    remove: list[int] | None = None,
    register: bool = True,
    progress: bool = True,
) -> dict:
    """Run the main job into ``out`` (default :func:`default_out`); returns the summary (also summary.json).

    Writes ``dataset.zarr``, ``validation.zarr``, ``plans.json``, ``surrogate/``, ``scores.json`` (+ PNGs),
    ``summary.json`` and, with ``budget`` (active sampling: total oracle rows), ``active_sampling.json``.
    ``plan_budget``: oracle passes for plan candidates, counted over the store's life (a rerun spends only what
    is left); ``remove``: the K values to plan (default 1 .. 30 % of the layers); ``register``: add the
    surrogate to the registry.

    Example:
        >>> run_main_job(model="./tiny", out=Path("runs/tiny"), n_masks=24, windows=2, seq_len=16)
    """
    started = time.perf_counter()
    out = Path(out) if out is not None else default_out(model)
    out.mkdir(parents=True, exist_ok=True)
    store_path, surrogate_dir, scores_path = out / "dataset.zarr", out / "surrogate", out / "scores.json"

    _heading("1/5 oracle: measure log-perplexity of layer masks")
    session = open_session(model=model, text=text, masks=sampling, n_masks=n_masks, out=store_path,
                           windows=windows, seq_len=seq_len, seed=seed, loading=loading, batch_size=batch_size,
                           cache_mb=cache_mb)
    store, evaluator = session.store, session.evaluator
    measure_masks(evaluator, store, session.masks, progress=progress)
    if budget is not None:
        report = run_active_sampling(evaluator, store, budget=budget, seed=seed, members=members, hidden=hidden,
                                     progress=progress)
        write_text_atomic(out / "active_sampling.json", json.dumps(report, indent=2, default=str))
    print(f"{len(store)} masks measured in {store_path}")

    _heading("2/5 plans: search removal sets with the oracle in the loop")
    planned = len(store) - int((~store.missing(session.masks)).sum())  # plan rows of earlier runs
    if (out / PLANS_FILE).is_file():  # a finished plan stage: choose again from the stored rows, measure nothing
        planned = plan_budget
    plans = run_plans(session, text=text, out=out, ks=remove, budget=max(0, plan_budget - planned),
                      windows=windows, seq_len=seq_len, seed=seed, batch_size=batch_size, cache_mb=cache_mb,
                      progress=progress)
    print(f"{plans['passes']} new plan candidates measured; {len(store)} rows in {store_path}")
    session.close()  # the store's write lock: nothing below writes to it

    _heading("3/5 surrogate: learn mask -> log-perplexity")
    surrogate = train_surrogate(store, surrogate_dir, members=members, seed=seed, hidden=hidden, progress=progress)
    print(training_report(surrogate.metadata["metrics"], members, seed, surrogate_dir))

    _heading("4/5 scores")
    record = score_surrogate(surrogate, scores_path, surrogate_dir=surrogate_dir,
                             progress=False if not progress else None, prog="layershap run")

    _heading("5/5 summary")
    summary = summarize(record, store, plans)
    print(format_summary(summary))
    write_json(out / "summary.json", summary)
    if register:
        from layershap.surrogate.registry import register_trained

        entry = register_trained(surrogate_dir, getattr(session.loaded.model.config, "model_type", None))
        print(f"registered the surrogate as {entry.family}/{entry.id} (layershap registry list)")
    print(f"\nwrote {out}/: dataset.zarr, validation.zarr, plans.json, surrogate/, scores.json (+ .png), "
          f"summary.json ({time.perf_counter() - started:.0f} s in all)")
    return summary


def summarize(record: ScoresRecord, store: DatasetStore, plans: dict) -> dict:
    """Per-layer rows (score, s.e., rank, leave-one-out perplexity), the plans, and the suggestions for 10/20/30 %
    depth reduction (the plan for that K, with the K lowest scores beside it for reference).

    Example:
        >>> print(format_summary(summarize(record, store, read_plans("runs/gemma-3-270m"))))
    """
    scores = record.scores
    ranking = scores.ranking().tolist()
    n = scores.n_layers
    masks, nll = store.masks, store.nll
    full = masks.all(axis=1)
    full_nll = float(nll[full][0]) if full.any() else float("nan")
    loo = {int(np.flatnonzero(~m)[0]): float(v) for m, v in zip(masks, nll) if (~m).sum() == 1}
    rank = {layer: pos + 1 for pos, layer in enumerate(ranking)}
    layers = [{"layer": i, "score": float(scores.values[i]), "stderr": float(scores.stderr[i]),
               "rank": rank[i], "loo_perplexity": math.exp(loo[i]) if i in loo else None} for i in range(n)]
    by_k = {int(p["k"]): p for p in plans["plans"]}
    suggestions = []
    for frac in DEPTH_REDUCTIONS:
        k = max(1, round(frac * n))
        if k not in by_k:
            continue
        p = by_k[k]
        suggestions.append({
            "depth_reduction": frac, "remove": k, "layers": p["removed"], "measured_perplexity": p["perplexity"],
            "validation_perplexity": p["validation_perplexity"],
            "lowest_score_layers": sorted(int(i) for i in ranking[:k]),
        })
    return {"model_id": record.model_id, "n_layers": n, "index": scores.index,
            "full_perplexity": math.exp(full_nll), "layers": layers, "plans": plans["plans"],
            "plan_passes": plans["passes"], "validation_passes": plans["validation_passes"],
            "plan_search_stopped": plans["stopped"], "suggestions": suggestions}


def format_summary(summary: dict) -> str:
    """The table people read: layer, score ± s.e., rank, leave-one-out perplexity; then the suggestions.

    Example:
        >>> print(format_summary(summary))
    """
    title = (f"{summary['model_id']}: {summary['n_layers']} layers, full-model perplexity "
             f"{summary['full_perplexity']:.2f}; scores = {summary['index']} of -nll (higher = more important)")
    lines = [title, f"{'layer':>5}  {'score':>10}  {'± s.e.':>8}  {'rank':>4}  {'LOO ppl':>10}"]
    for row in summary["layers"]:
        loo = f"{row['loo_perplexity']:.4g}" if row["loo_perplexity"] is not None else "-"
        lines.append(f"{row['layer']:>5}  {row['score']:>10.4f}  {row['stderr']:>8.4f}  {row['rank']:>4}  {loo:>10}")
    lines.append("rank 1 = least important (removed first)")
    lines.append("")
    lowest = {int(p["k"]): sorted(int(i) for i in np.argsort([r["score"] for r in summary["layers"]],
                                                            kind="stable")[: int(p["k"])]) for p in summary["plans"]}
    lines.append(format_plans({"plans": summary["plans"], "full_perplexity": summary["full_perplexity"],
                               "passes": summary["plan_passes"], "validation_passes": summary["validation_passes"],
                               "stopped": summary["plan_search_stopped"]}, lowest))
    lines.append("depth reductions: " + "; ".join(
        f"{s['depth_reduction']:.0%} -> remove {s['layers']}" for s in summary["suggestions"]))
    return "\n".join(lines)
