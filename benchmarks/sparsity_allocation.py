"""Do layershap's layer scores help Wanda? Held-out perplexity of uniform vs OWL vs score-based budgets.

The embedded default model is pruned with Wanda (layer by layer, calibrated on the oracle's calibration text,
``builtin``) to per-layer budgets from each allocation and evaluated on two held-out texts never used for
calibration (consecutive non-overlapping windows, BOS per window, ``evaluate_perplexity``):

* ``gpl3``: ``/usr/share/common-licenses/GPL-3`` (legal English);
* ``email-arch``: ``email/architecture.rst`` of the Python standard library (an English design essay on the
  email package; ships with every CPython, in Debian's libpython3.x-minimal).

Allocations: ``uniform``; ``owl`` (outlier ratios of the dense model's calibration activations, m = 5); and one
``scores`` allocation per score source: a scores JSON (``label=path.json``) or an index computed here from the
surrogate (``shapley``, ``banzhaf``, ``semivalue[A:B]``, ``k[K]``). ``owl`` maps its ratios with OWL's own
formula, the ``scores`` allocations with layershap's bounded linear mapping, both with ``lambda``. Rows, in the order measured: 70 % unstructured, the lambda sweep at 70 %, 2:4
(mixed n:4 per layer for non-uniform budgets; identical to uniform when lambda rounds away), then 60 and 50 %.
A configuration whose per-layer pruning counts equal one already measured is not pruned again; Ctrl-C prints the
tables of the rows finished so far. Cells: perplexity and, in brackets, the ratio to uniform (< 1 = better).
Each pruned model costs about 2 minutes on a busy 2-core CPU (most of it the 262k-token LM head of the held-out
evaluation), so the default sizes are small: 4 x 128 calibration tokens, 2 x 256 held-out tokens per text.

Example:
    $ python benchmarks/sparsity_allocation.py
    $ python benchmarks/sparsity_allocation.py --scores semivalue=artifacts/gemma-3-270m/scores.json shapley \\
          k4=runs/k4-scores.json --lambdas 0.04,0.16
"""

from __future__ import annotations

import argparse
import email
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = {
    "gpl3": Path("/usr/share/common-licenses/GPL-3"),
    "email-arch": Path(email.__file__).parent / "architecture.rst",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--scores", nargs="+", default=[f"semivalue[1:9]={ROOT}/artifacts/gemma-3-270m/scores.json",
                                                    "shapley"],
                   help="score sources: LABEL=path.json, or an index name computed from --surrogate")
    p.add_argument("--surrogate", default=str(ROOT / "artifacts/gemma-3-270m/surrogate"))
    p.add_argument("--sparsities", default="0.5,0.6,0.7", help="unstructured targets")
    p.add_argument("--patterns", default="2:4", help="N:M patterns (comma-separated; empty for none)")
    p.add_argument("--lam", type=float, default=0.08, help="lambda of the main rows (default 0.08)")
    p.add_argument("--lambdas", default="0.04,0.16", help="lambda sweep at the highest target")
    p.add_argument("--calib-windows", type=int, default=4, help="calibration windows of builtin text (default 4)")
    p.add_argument("--calib-seq-len", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=2, help="held-out windows per text (default 2)")
    p.add_argument("--eval-seq-len", type=int, default=256)
    return p.parse_args(argv)


def score_sources(specs: list[str], surrogate_dir: str, n_layers: int) -> dict[str, np.ndarray]:
    """label -> per-layer scores, read from a JSON file or computed from the surrogate for an index name
    (``shapley``, ``banzhaf``, ``semivalue[A:B]``, ``k[K]``)."""
    import re

    from layershap.shapley.estimate import ensemble_scores
    from layershap.shapley.scores_io import read_scores
    from layershap.shapley.semivalues import choose_index
    from layershap.surrogate.checkpoint import load_surrogate
    from layershap.surrogate.metrics import not_validated

    out, surrogate = {}, None
    for spec in specs:
        label, sep, path = spec.partition("=")
        if sep:
            values = read_scores(path).scores.values
        else:
            name = re.fullmatch(r"\s*(\w+)\s*(?:\[([\d:\s]+)\])?\s*", label)
            if name is None:
                raise SystemExit(f"{spec}: not LABEL=path.json nor shapley, banzhaf, semivalue[A:B] or k[K]")
            surrogate = surrogate or load_surrogate(surrogate_dir)
            index = choose_index(name.group(1), name.group(2), surrogate.metadata.get("removed_counts"), n_layers,
                                 not_validated(surrogate.metadata))
            values = ensemble_scores(surrogate, index, method="exact", progress=False).values
        if values.size != n_layers:
            raise SystemExit(f"{spec}: {values.size} scores for {n_layers} layers")
        out[label] = values
    return out


def main(argv: list[str] | None = None) -> int:
    from layershap.oracle.heldout import evaluate_perplexity
    from layershap.oracle.loading import load_model
    from layershap.oracle.text import load_text, make_windows
    from layershap.pruning.allocation import layer_budgets
    from layershap.pruning.sparsify import decoder_linears, owl_outlier_ratios, plan_counts, sparsify_layers

    args = parse_args(argv)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="sparsity-bench-"))
    texts = {}
    for label, path in HELD_OUT.items():
        texts[label] = tmp / f"{label}.txt"  # load_text reads .txt files
        shutil.copyfile(path, texts[label])

    lm = load_model(args.model)
    linears = decoder_linears(lm.model)
    n = len(linears)
    dense = [[m.weight.detach().clone() for _, m in layer] for layer in linears]
    calib = make_windows(lm.tokenizer, load_text("builtin").text, args.calib_windows, args.calib_seq_len, 0)
    values = {"owl": owl_outlier_ratios(lm.model, calib)}
    values.update(score_sources(args.scores, args.surrogate, n))
    allocations = ["uniform", *values]

    def evaluate() -> dict[str, float]:
        return {label: evaluate_perplexity(lm, str(path), args.eval_seq_len, args.eval_windows, 1)["perplexity"]
                for label, path in texts.items()}

    targets = sorted((float(x) for x in args.sparsities.split(",")), reverse=True)
    rows = [("unstructured", targets[0], args.lam)]  # the headline row first, then the sweep, then the rest
    rows += [("unstructured", targets[0], float(lam)) for lam in args.lambdas.split(",") if lam]
    for pattern in filter(None, args.patterns.split(",")):
        kept, group = (int(x) for x in pattern.split(":"))
        rows.append((pattern, (group - kept) / group, args.lam))
    rows += [("unstructured", t, args.lam) for t in targets[1:]]

    print(f"model {lm.model_id}; Wanda calibrated on builtin ({args.calib_windows} x {args.calib_seq_len} tokens); "
          f"held out: {', '.join(f'{k} ({p})' for k, p in HELD_OUT.items())}, {args.eval_windows} x "
          f"{args.eval_seq_len} tokens each", flush=True)
    dense_ppl = evaluate()
    print(f"dense: {dense_ppl}", flush=True)
    cache: dict[tuple, dict[str, float]] = {}
    results: dict[tuple, dict[str, dict[str, float]]] = {}
    try:
        for pattern, target, lam in rows:
            for alloc in allocations:
                kind = "uniform" if alloc == "uniform" else ("owl" if alloc == "owl" else "scores")
                budgets = layer_budgets(kind, n, target, lam, values.get(alloc))
                key = (pattern, tuple(plan_counts(linears, budgets, pattern)))
                if key not in cache:
                    with torch.no_grad():
                        for layer, weights in zip(linears, dense):
                            for (_, m), w in zip(layer, weights):
                                m.weight.copy_(w)
                    t0 = time.perf_counter()
                    sparsify_layers(lm.model, calib, budgets, "wanda", pattern, progress=False)
                    t1 = time.perf_counter()
                    cache[key] = evaluate()
                    print(f"  {pattern:>12} {target:.2f} lambda {lam:.2f} {alloc:>16}: "
                          + ", ".join(f"{k} {v:.3f}" for k, v in cache[key].items())
                          + f"  (prune {t1 - t0:.0f} s, eval {time.perf_counter() - t1:.0f} s)", flush=True)
                results.setdefault((pattern, target, lam), {})[alloc] = cache[key]
    except KeyboardInterrupt:  # Ctrl-C: print the rows finished so far
        print("interrupted: tables of the finished rows", flush=True)
        results = {row: cells for row, cells in results.items() if len(cells) == len(allocations)}
    shutil.rmtree(tmp, ignore_errors=True)
    print_tables(results, allocations, dense_ppl, list(texts))
    print(f"\n{len(cache)} pruned models measured in {(time.perf_counter() - started) / 60:.1f} min")
    return 0


def print_tables(results: dict, allocations: list[str], dense: dict[str, float], texts: list[str]) -> None:
    """One table per held-out text plus the geometric mean of the ratios over the texts."""
    width = max(16, *(len(a) + 2 for a in allocations))
    head = f"{'pattern':>12} {'target':>6} {'lambda':>6} " + "".join(f"{a:>{width}}" for a in allocations)
    for text in [*texts, None]:
        title = f"held-out {text}: perplexity (ratio to uniform)" if text else (
            "both texts: geometric mean of the perplexity ratio to uniform")
        extra = f"; dense {dense[text]:.3f}" if text else ""
        print(f"\n{title}{extra}\n{head}")
        for (pattern, target, lam), cells in results.items():
            line = f"{pattern:>12} {target:>6.2f} {lam:>6.2f} "
            for alloc in allocations:
                ratio = math.exp(np.mean([math.log(cells[alloc][t] / cells["uniform"][t]) for t in texts]))
                if text is None:
                    line += f"{ratio:>{width}.3f}"
                else:
                    ppl = cells[alloc][text]
                    cell = f"{ppl:.2f}" if alloc == "uniform" else f"{ppl:.2f} ({ppl / cells['uniform'][text]:.3f})"
                    line += f"{cell:>{width}}"
            print(line)


if __name__ == "__main__":
    raise SystemExit(main())
