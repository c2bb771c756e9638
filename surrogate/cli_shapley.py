"""``layershap shapley SURROGATE_DIR --out scores.json``: layer scores from a trained surrogate.

Which index (``--index``, ``--sizes``): a surrogate is trustworthy only on the removed-layer counts it was trained
on (``metadata["removed_counts"]``). ``auto`` picks the pruning-range semivalue over ``1..R`` removed layers,
``R`` the largest count such that ``0..R`` all occur in the training data — or the Shapley value when every count
``0..n`` occurs. An index that weights counts the data lack (e.g. ``--index shapley`` on a surrogate trained on
up to half the layers removed) warns, naming them, and proceeds.

Which method (``--method``): ``auto`` = exact enumeration for n ≤ 22, Monte Carlo above; ``mc`` = paired
permutation sampling for the Shapley value, size-stratified sampling for other indices (or name one:
``mc-permutation`` / ``mc-stratified``); ``--budget`` = value-function evaluations for Monte Carlo.

Writes the scores JSON (scores_io.py), ``<stem>.png`` (bar chart with error bars), ``<stem>_fit.png`` (the
surrogate's predicted vs measured nll on held-out masks, when ``validation.npz`` is there) and, with
``--interactions``, ``<stem>_interactions.png``; prints a table of layer, score ± s.e., rank.

Example:
    $ layershap shapley runs/default/surrogate --out runs/default/scores.json
    $ layershap shapley runs/default/surrogate --out shap.json --index shapley --method mc --budget 200000
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from layershap.oracle.errors import LayershapError

from .semivalues import Index, covered_prefix, default_index, parse_sizes, uncovered_counts

INDEX_CHOICES = ("auto", "shapley", "semivalue", "banzhaf")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``layershap shapley``."""
    from .shapley import DEFAULT_BUDGET, METHODS

    parser.add_argument("surrogate_dir", metavar="SURROGATE_DIR", help="folder written by `layershap train`")
    parser.add_argument("--out", default="scores.json",
                        help="scores JSON to write; the PNGs go next to it (default: ./scores.json)")
    parser.add_argument("--method", choices=METHODS, default="auto",
                        help="exact enumeration, Monte Carlo, or auto (exact for n <= 22) (default: auto)")
    parser.add_argument("--index", choices=INDEX_CHOICES, default="auto",
                        help="shapley, banzhaf, or the pruning-range semivalue over --sizes; auto = what the "
                             "surrogate's training data cover (default: auto)")
    parser.add_argument("--sizes", metavar="A:B", default=None,
                        help="removed-layer counts A..B for the pruning-range semivalue (implies --index semivalue)")
    parser.add_argument("--budget", type=int, default=DEFAULT_BUDGET,
                        help=f"value-function evaluations for Monte Carlo (default: {DEFAULT_BUDGET:,})")
    parser.add_argument("--interactions", action="store_true",
                        help="also compute the pairwise Shapley interaction matrix (exact, n <= 24)")
    parser.add_argument("--seed", type=int, default=0, help="Monte Carlo seed (default: 0)")
    parser.add_argument("--batch-size", type=int, default=1 << 16, help="masks per surrogate call (default: 65536)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def choose_index(index: str, sizes: str | None, removed_counts: list[int] | None, n: int) -> Index:
    """The :class:`Index` for the CLI options, given the surrogate's training removed counts.

    Example:
        >>> choose_index("auto", None, [0, 1, 2, 3], 8).name
        'semivalue[1:3]'
    """
    if sizes is not None:
        if index not in ("auto", "semivalue"):
            raise LayershapError(f"--sizes sets the pruning-range semivalue; it cannot be combined with --index {index}")
        low, high = parse_sizes(sizes)
        chosen = Index("semivalue", low, high)
    elif index == "auto":
        if removed_counts is None:
            warnings.warn("the surrogate's metadata list no removed_counts, so its coverage is unknown; "
                          "computing the Shapley value", stacklevel=2)
            chosen = Index("shapley")
        else:
            chosen = default_index(removed_counts, n)
    elif index == "semivalue":
        r_max = covered_prefix(removed_counts or [])
        if r_max < 1:
            raise LayershapError("the surrogate's data do not cover 0..1 removed layers; give the range with --sizes A:B")
        chosen = Index("semivalue", 1, min(r_max, n))
    else:
        chosen = Index(index)
    chosen.validate(n)
    return chosen


def coverage_report(chosen: Index, removed_counts: list[int] | None, n: int) -> dict:
    """Removed-layer counts in the data, weighted by ``chosen``, and uncovered; warns when any are uncovered."""
    weighted = chosen.removed_counts_used(n)
    if removed_counts is None:
        return {"removed_counts_in_data": None, "removed_counts_weighted": weighted, "uncovered": None}
    missing = uncovered_counts(chosen, removed_counts, n)
    if missing:
        warnings.warn(
            f"{chosen.name} weights models with {_ranges(missing)} layers removed, which the surrogate never "
            f"saw in training (its data cover {_ranges(sorted(removed_counts))} removed); its scores rest on "
            "extrapolation there. Use --index auto for the range the data support, or measure more masks "
            "(all-sizes strata) and retrain.",
            UserWarning,
            stacklevel=2,
        )
    return {"removed_counts_in_data": sorted(int(r) for r in removed_counts), "removed_counts_weighted": weighted,
            "uncovered": missing}


def _ranges(values: list[int]) -> str:
    """``[1, 2, 3, 7, 9, 10]`` -> ``'1-3, 7, 9-10'``."""
    parts, start, prev = [], None, None
    for v in values:
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = v
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ", ".join(parts)


def run(args: argparse.Namespace) -> int:
    """Compute, write, plot and print the scores; returns 0."""
    import numpy as np

    from .checkpoint import load_surrogate
    from .plot_fit import VALIDATION_FILE, plot_validation
    from .plot_scores import plot_interactions, plot_scores
    from .scores_io import write_scores
    from .shapley import MAX_EXACT_LAYERS, ensemble_scores, resolve_method, scores_table

    out = Path(args.out)
    if out.suffix.lower() != ".json":
        raise LayershapError(f"--out {out} should name a .json file (the PNGs are written next to it)")
    surrogate = load_surrogate(args.surrogate_dir)
    n = surrogate.n_layers
    meta = surrogate.metadata
    removed = meta.get("removed_counts")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = choose_index(args.index, args.sizes, removed, n)
        coverage = coverage_report(chosen, removed, n)
        missing_all = uncovered_counts(Index("shapley"), removed, n) if removed is not None else []
        if args.interactions and missing_all:
            warnings.warn(f"the Shapley interaction index weights every removed-layer count, and the surrogate "
                          f"never saw {_ranges(missing_all)} layers removed in training", UserWarning, stacklevel=1)
    notes = [str(w.message) for w in caught]
    for note in notes:
        print(f"layershap shapley: warning: {note}", file=sys.stderr)
    if args.interactions and n > MAX_EXACT_LAYERS:
        raise LayershapError(f"--interactions needs exact enumeration (n <= {MAX_EXACT_LAYERS}); this model has {n}")
    method = resolve_method(args.method, n, chosen)
    progress = False if args.quiet else None
    scores = ensemble_scores(surrogate, chosen, method, budget=args.budget, seed=args.seed,
                             interactions=args.interactions, batch_size=args.batch_size, progress=progress)

    doc = write_scores(out, scores, meta, source=Path(args.surrogate_dir), index_description=chosen.describe(n),
                       coverage=coverage, extra_fields={"warnings": notes})
    label = meta.get("model_id") or "model"
    written = [out, plot_scores(scores, out.with_suffix(".png"), title=f"{label}: {chosen.name}, {scores.method}")]
    if (Path(args.surrogate_dir) / VALIDATION_FILE).is_file():
        written.append(plot_validation(args.surrogate_dir, out.with_name(out.stem + "_fit.png")))
    if args.interactions:
        written.append(plot_interactions(scores.extra["interactions"], out.with_name(out.stem + "_interactions.png")))

    print(f"{label}: {n} layers; {chosen.describe(n)}")
    print(scores_table(scores))
    eff = doc["efficiency"]
    if eff and eff.get("applies"):
        print(f"efficiency: sum of scores {eff['sum_scores']:.6f} vs v(full) - v(empty) "
              f"{eff['v_full_minus_v_empty']:.6f} ({'ok' if eff['ok'] else 'VIOLATED'})")
    if args.interactions:
        inter = scores.extra["interactions"]
        i, j = np.unravel_index(np.argmax(np.abs(inter)), inter.shape)
        print(f"strongest pairwise interaction: layers {i} and {j}: {inter[i, j]:+.6f}")
    print(f"{scores.extra.get('seconds', 0.0):.2f} s; wrote " + ", ".join(str(p) for p in written))
    return 0

