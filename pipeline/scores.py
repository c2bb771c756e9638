"""Scores of a trained surrogate, the way ``layershap shapley`` and ``layershap run`` compute, write and print
them: the index its data support (or the one asked for), exact or Monte Carlo, the ensemble's disagreement in
the standard errors; the scores JSON, a bar chart, the predicted-vs-measured plot, and a table on stdout.

Example:
    >>> record = score_surrogate(load_surrogate("runs/x/surrogate"), Path("runs/x/scores.json"),  # doctest: +SKIP
    ...                          surrogate_dir=Path("runs/x/surrogate"))
    >>> record.scores.ranking()[:3]  # doctest: +SKIP
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np

from layershap.core.errors import LayershapError
from layershap.shapley.estimate import DEFAULT_BUDGET, ensemble_scores, resolve_method, scores_table
from layershap.shapley.exact import DEFAULT_BATCH, MAX_EXACT_LAYERS
from layershap.shapley.plot_scores import plot_interactions, plot_scores
from layershap.shapley.scores_io import ScoresRecord, write_scores
from layershap.shapley.semivalues import Index, choose_index, coverage_report, ranges_text, uncovered_counts
from layershap.surrogate.checkpoint import Surrogate
from layershap.surrogate.metrics import not_validated
from layershap.surrogate.plot_fit import VALIDATION_FILE, plot_validation


def check_scores_path(out: Path) -> None:
    """The scores file must be a ``.json`` path (the PNGs are written next to it)."""
    if out.suffix.lower() != ".json":
        raise LayershapError(f"--out {out} should name a .json file (the PNGs are written next to it)")


def score_surrogate(
    surrogate: Surrogate,
    out: Path,
    *,
    surrogate_dir: Path | None = None,
    index: str = "auto",
    sizes: str | None = None,
    method: str = "auto",
    mc_evals: int = DEFAULT_BUDGET,
    interactions: bool = False,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH,
    progress: bool | None = None,
    prog: str = "layershap shapley",
) -> ScoresRecord:
    """Compute, write, plot and print the scores of ``surrogate``; returns the record written to ``out``.

    ``surrogate_dir``: where the surrogate lives (recorded as the scores' source; its ``validation.npz`` gives
    ``<stem>_fit.png``). Coverage warnings go to stderr prefixed with ``prog``. ``progress`` None = bars only
    for long enumerations.

    Example:
        >>> score_surrogate(sur, Path("scores.json"), index="shapley", method="mc", mc_evals=200_000)  # doctest: +SKIP
    """
    check_scores_path(out)
    n = surrogate.n_layers
    meta = surrogate.metadata
    removed, excluded = meta.get("removed_counts"), not_validated(meta)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = choose_index(index, sizes, removed, n, excluded)
        coverage = coverage_report(chosen, removed, n, excluded)
        missing_all = uncovered_counts(Index("shapley"), removed, n) if removed is not None else []
        if interactions and missing_all:
            warnings.warn(f"the Shapley interaction index weights every removed-layer count, and the surrogate "
                          f"never saw {ranges_text(missing_all)} layers removed in training", UserWarning,
                          stacklevel=1)
    notes = [str(w.message) for w in caught]
    for note in notes:
        print(f"{prog}: warning: {note}", file=sys.stderr)
    if interactions and n > MAX_EXACT_LAYERS:
        raise LayershapError(f"--interactions needs exact enumeration (n <= {MAX_EXACT_LAYERS}); this model has {n}")
    concrete = resolve_method(method, n, chosen)
    scores = ensemble_scores(surrogate, chosen, concrete, budget=mc_evals, seed=seed, interactions=interactions,
                             batch_size=batch_size, progress=progress)

    record = write_scores(out, scores, meta, source=surrogate_dir, index_description=chosen.describe(n),
                          coverage=coverage, warnings=notes)
    label = meta.get("model_id") or "model"
    written = [out, plot_scores(scores, out.with_suffix(".png"), title=f"{label}: {chosen.name}, {scores.method}")]
    if surrogate_dir is not None and (Path(surrogate_dir) / VALIDATION_FILE).is_file():
        written.append(plot_validation(surrogate_dir, out.with_name(out.stem + "_fit.png")))
    if interactions:
        written.append(plot_interactions(scores.extra["interactions"], out.with_name(out.stem + "_interactions.png")))

    print(f"{label}: {n} layers; {chosen.describe(n)}")
    print(scores_table(scores))
    eff = scores.extra.get("efficiency")
    if eff and eff.get("applies"):
        print(f"efficiency: sum of scores {eff['sum_scores']:.6f} vs v(full) - v(empty) "
              f"{eff['v_full_minus_v_empty']:.6f} ({'ok' if eff['ok'] else 'VIOLATED'})")
    if interactions:
        inter = scores.extra["interactions"]
        i, j = np.unravel_index(np.argmax(np.abs(inter)), inter.shape)
        print(f"strongest pairwise interaction: layers {i} and {j}: {inter[i, j]:+.6f}")
    print(f"{scores.extra.get('seconds', 0.0):.2f} s; wrote " + ", ".join(str(p) for p in written))
    return record
