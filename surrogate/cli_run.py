"""``layershap run``: the main job in one command.

oracle on stratified masks -> surrogate ensemble -> layer scores (the index the data support) -> a table of
layer, score ± s.e., rank and leave-one-out perplexity, and the layers to remove for 10/20/30 % depth
reduction (surrogate-guided subset search, the best candidates re-measured by the oracle). Everything goes into
one folder; running the same command again resumes the oracle where it stopped.

Example:
    $ layershap run                                   # Gemma-3-270M on Python's docs, CPU defaults
    $ layershap run --model ./my-llama --text calib.txt --masks 256 --out runs/llama
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

DEPTH_REDUCTIONS = (0.10, 0.20, 0.30)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from layershap.oracle.cli_oracle import non_negative_int, positive_int
    from layershap.surrogate.network import DEFAULT_HIDDEN

    parser.add_argument("--model", default="gemma-3-270m",
                        help="gemma-3-270m (embedded default), a .gguf file, a local model dir or a hub id")
    parser.add_argument("--text", default="builtin", help="calibration text: builtin, .txt/.jsonl, wikitext2, c4")
    parser.add_argument("--out", default=None, help="output folder (default runs/<model name>)")
    parser.add_argument("--masks", type=positive_int, default=160,
                        help="oracle masks, including the full model and all leave-one-out masks (default 160)")
    parser.add_argument("--sampling", choices=("stratified", "stratified-all"), default="stratified",
                        help="stratified = 1..ceil(n/2) layers removed (pruning range, scores = semivalue over "
                             "that range); stratified-all = every count 1..n (scores = Shapley value)")
    parser.add_argument("--budget", type=positive_int, default=None,
                        help="active sampling: total oracle passes; after the initial --masks, add masks where the "
                             "surrogate ensemble disagrees until the ranking is stable or the budget is spent")
    parser.add_argument("--windows", type=positive_int, default=4, help="token windows per mask (default 4)")
    parser.add_argument("--seq-len", type=positive_int, default=128, help="tokens per window (default 128)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of windows, masks, training")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward pass (default 4)")
    parser.add_argument("--cache-mb", type=positive_int, default=None,
                        help="memory budget for cached hidden states of shared layer prefixes (oracle)")
    parser.add_argument("--members", type=positive_int, default=8, help="surrogate ensemble size (default 8)")
    parser.add_argument("--hidden", type=positive_int, default=DEFAULT_HIDDEN,
                        help=f"surrogate hidden units (default {DEFAULT_HIDDEN})")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _sub_args(command: str, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` with another subcommand's own parser, so its defaults and checks apply unchanged."""
    import importlib

    from .cli import COMMANDS

    parser = argparse.ArgumentParser(prog=f"layershap {command}")
    importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
    return parser.parse_args(argv)


def _heading(text: str) -> None:
    print(f"\n== {text} ==", flush=True)


def run(args: argparse.Namespace) -> int:
    from layershap.oracle.cli_oracle import open_session
    from layershap.oracle.measure import StoreOracle, measure_masks

    from . import cli_shapley, cli_train
    from .checkpoint import load_surrogate
    from .scores_io import read_scores

    started = time.perf_counter()
    out = Path(args.out or Path("runs") / Path(args.model).name.replace(".gguf", ""))
    out.mkdir(parents=True, exist_ok=True)
    store_path, surrogate_dir, scores_path = out / "dataset.zarr", out / "surrogate", out / "scores.json"
    quiet = ["--no-progress"] if args.no_progress else []

    _heading("1/4 oracle: measure log-perplexity of layer masks")
    oracle_args = _sub_args("oracle", [
        "--model", args.model, "--text", args.text, "--masks", args.sampling, "--n-masks", str(args.masks),
        "--out", str(store_path), "--windows", str(args.windows), "--seq-len", str(args.seq_len),
        "--seed", str(args.seed), "--device", args.device, "--batch-size", str(args.batch_size), *quiet,
        *(["--cache-mb", str(args.cache_mb)] if args.cache_mb else [])])
    session = open_session(oracle_args)
    store, evaluator = session.store, session.evaluator
    measure_masks(evaluator, store, session.masks, progress=not args.no_progress)
    train_argv = [str(store_path), "--out", str(surrogate_dir), "--members", str(args.members),
                  "--seed", str(args.seed), "--hidden", str(args.hidden), *quiet]
    if args.budget is not None:
        from .active import run_active_sampling

        report = run_active_sampling(evaluator, store, budget=args.budget, seed=args.seed,
                                     members=args.members, hidden=args.hidden, progress=not args.no_progress)
        (out / "active_sampling.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"{len(store)} masks measured in {store_path}")

    _heading("2/4 surrogate: learn mask -> log-perplexity")
    cli_train.run(_sub_args("train", train_argv))

    _heading("3/4 scores")
    cli_shapley.run(_sub_args("shapley", [str(surrogate_dir), "--out", str(scores_path),
                                          *(["--quiet"] if args.no_progress else [])]))

    _heading("4/4 summary")
    doc = read_scores(scores_path)
    surrogate = load_surrogate(surrogate_dir)
    oracle = StoreOracle(evaluator, store, progress=not args.no_progress)
    summary = summarize(doc, store, surrogate, oracle, progress=not args.no_progress)
    print(format_summary(summary))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {out}/: dataset.zarr, surrogate/, scores.json (+ .png), summary.json "
          f"({time.perf_counter() - started:.0f} s in all)")
    return 0


def summarize(doc: dict, store, surrogate, oracle, progress: bool = True) -> dict:
    """Per-layer rows (score, s.e., rank, leave-one-out perplexity) and depth-reduction suggestions.

    Suggestions come from the surrogate-guided subset search (exhaustive or beam), its top candidates
    re-measured by ``oracle`` (a value function, -nll); the measured winner is the suggestion.
    """
    import numpy as np

    from .subset_search import search_and_verify

    n = int(doc["n_layers"])
    masks, nll = store.masks, store.nll
    full = masks.all(axis=1)
    full_nll = float(nll[full][0]) if full.any() else float("nan")
    loo = {int(np.flatnonzero(~m)[0]): float(v) for m, v in zip(masks, nll) if (~m).sum() == 1}
    rank = {layer: pos + 1 for pos, layer in enumerate(doc["ranking"])}
    layers = [{"layer": i, "score": float(doc["scores"][i]), "stderr": float(doc["stderr"][i]),
               "rank": rank[i], "loo_perplexity": math.exp(loo[i]) if i in loo else None} for i in range(n)]
    suggestions = []
    for frac in DEPTH_REDUCTIONS:
        k = max(1, round(frac * n))
        res = search_and_verify(surrogate, oracle, n, k, top=3, progress=progress)
        suggestions.append({
            "depth_reduction": frac, "remove": k, "layers": sorted(int(i) for i in res.winner.removed),
            "predicted_perplexity": math.exp(-res.winner.predicted),
            "measured_perplexity": math.exp(-res.winner.measured),
            "lowest_score_layers": sorted(int(i) for i in doc["ranking"][:k]),
        })
    return {"model_id": doc.get("model_id"), "n_layers": n, "index": doc.get("index"),
            "full_perplexity": math.exp(full_nll), "layers": layers, "suggestions": suggestions}


def format_summary(summary: dict) -> str:
    """The table people read: layer, score ± s.e., rank, leave-one-out perplexity; then the suggestions."""
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
