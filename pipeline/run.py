"""The main job as library calls: oracle on stratified masks -> surrogate ensemble (kept in memory) -> layer
scores (the index the data support) -> summary: a table of layer, score ± s.e., rank and leave-one-out
perplexity, and the layers to remove for 10/20/30 % depth reduction (surrogate-guided subset search, the best
candidates re-measured by the oracle). Everything goes into one folder; running the same job again resumes the
oracle where it stopped and never measures a mask twice.

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

from layershap.core.jsonio import write_json, write_text_atomic
from layershap.oracle.measure import CachedOracle, measure_masks
from layershap.oracle.session import open_session
from layershap.oracle.store import DatasetStore
from layershap.pruning.search import search_and_verify
from layershap.shapley.game import ValueFunction
from layershap.shapley.scores_io import ScoresRecord
from layershap.surrogate.metrics import training_report
from layershap.surrogate.network import DEFAULT_HIDDEN
from layershap.surrogate.train import train_surrogate

from .active import run_active_sampling
from .scores import score_surrogate

DEPTH_REDUCTIONS = (0.10, 0.20, 0.30)
DEFAULT_N_MASKS = 160  # oracle masks of the main job, full model and leave-one-out included


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
    n_masks: int = DEFAULT_N_MASKS,
    sampling: str = "stratified",
    budget: int | None = None,
    windows: int = 4,
    seq_len: int = 128,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 4,
    cache_mb: int | None = None,
    members: int = 8,
    hidden: int = DEFAULT_HIDDEN,
    progress: bool = True,
) -> dict:
    """Run the main job into ``out`` (default :func:`default_out`); returns the summary (also summary.json).

    Writes ``dataset.zarr``, ``surrogate/``, ``scores.json`` (+ PNGs), ``summary.json`` and, with ``budget``
    (active sampling: total oracle rows), ``active_sampling.json``.

    Example:
        >>> run_main_job(model="./tiny", out=Path("runs/tiny"), n_masks=24, windows=2, seq_len=16)
    """
    started = time.perf_counter()
    out = Path(out) if out is not None else default_out(model)
    out.mkdir(parents=True, exist_ok=True)
    store_path, surrogate_dir, scores_path = out / "dataset.zarr", out / "surrogate", out / "scores.json"

    _heading("1/4 oracle: measure log-perplexity of layer masks")
    session = open_session(model=model, text=text, masks=sampling, n_masks=n_masks, out=store_path,
                           windows=windows, seq_len=seq_len, seed=seed, device=device, batch_size=batch_size,
                           cache_mb=cache_mb)
    store, evaluator = session.store, session.evaluator
    measure_masks(evaluator, store, session.masks, progress=progress)
    if budget is not None:
        report = run_active_sampling(evaluator, store, budget=budget, seed=seed, members=members, hidden=hidden,
                                     progress=progress)
        write_text_atomic(out / "active_sampling.json", json.dumps(report, indent=2, default=str))
    print(f"{len(store)} masks measured in {store_path}")

    _heading("2/4 surrogate: learn mask -> log-perplexity")
    surrogate = train_surrogate(store, surrogate_dir, members=members, seed=seed, hidden=hidden, progress=progress)
    print(training_report(surrogate.metadata["metrics"], members, seed, surrogate_dir))

    _heading("3/4 scores")
    record = score_surrogate(surrogate, scores_path, surrogate_dir=surrogate_dir,
                             progress=False if not progress else None, prog="layershap run")

    _heading("4/4 summary")
    oracle = CachedOracle(evaluator, store, progress=progress)
    summary = summarize(record, store, surrogate, oracle, progress=progress)
    print(format_summary(summary))
    write_json(out / "summary.json", summary)
    print(f"\nwrote {out}/: dataset.zarr, surrogate/, scores.json (+ .png), summary.json "
          f"({time.perf_counter() - started:.0f} s in all)")
    return summary


def summarize(record: ScoresRecord, store: DatasetStore, surrogate: ValueFunction, oracle: ValueFunction,
              progress: bool = True) -> dict:
    """Per-layer rows (score, s.e., rank, leave-one-out perplexity) and depth-reduction suggestions.

    Suggestions come from the surrogate-guided subset search (exhaustive or beam), its top candidates
    re-measured by ``oracle`` (a value function, -nll); the measured winner is the suggestion.

    Example:
        >>> print(format_summary(summarize(record, store, surrogate, CachedOracle(evaluator, store))))
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
    suggestions = []
    for frac in DEPTH_REDUCTIONS:
        k = max(1, round(frac * n))
        res = search_and_verify(surrogate, oracle, n, k, top=3, progress=progress)
        suggestions.append({
            "depth_reduction": frac, "remove": k, "layers": sorted(int(i) for i in res.winner.removed),
            "predicted_perplexity": math.exp(-res.winner.predicted),
            "measured_perplexity": math.exp(-res.winner.measured),
            "lowest_score_layers": sorted(int(i) for i in ranking[:k]),
        })
    return {"model_id": record.model_id, "n_layers": n, "index": scores.index,
            "full_perplexity": math.exp(full_nll), "layers": layers, "suggestions": suggestions}


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
    lines.append("suggested layers to remove (surrogate subset search, re-measured by the oracle):")
    for s in summary["suggestions"]:
        same = "" if s["layers"] == s["lowest_score_layers"] else f"  (lowest scores: {s['lowest_score_layers']})"
        lines.append(f"  {s['depth_reduction']:.0%} depth: remove {s['layers']} -> perplexity "
                     f"{s['measured_perplexity']:.4g} measured, {s['predicted_perplexity']:.4g} predicted{same}")
    return "\n".join(lines)
