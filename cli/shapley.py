"""``layershap shapley SURROGATE_DIR --out scores.json``: layer scores from a trained surrogate.

Which index (``--index``, ``--sizes``): ``auto`` picks what the surrogate's training data cover and its held-out
metrics validate (see :func:`layershap.shapley.semivalues.choose_index`); an index that weights removed-layer
counts the data lack or do not validate warns, naming them and why. Which method (``--method``): ``auto`` = exact enumeration for n <= 22, Monte Carlo above;
``mc`` = paired permutation sampling for the Shapley value, size-stratified sampling for other indices;
``--mc-evals`` = value-function evaluations for Monte Carlo.

Writes the scores JSON, ``<stem>.png`` (bar chart with error bars), ``<stem>_fit.png`` (the surrogate's
predicted vs measured nll, when ``validation.npz`` is there) and, with ``--interactions``,
``<stem>_interactions.png``; prints a table of layer, score ± s.e., rank.

Example:
    $ layershap shapley runs/default/surrogate --out runs/default/scores.json
    $ layershap shapley runs/default/surrogate --out shap.json --index shapley --method mc --mc-evals 200000
"""

from __future__ import annotations

from typing import Literal

from .options import non_negative, positive


def shapley(
    surrogate_dir: str,
    out: str = "scores.json",
    method: Literal["auto", "exact", "mc", "mc-permutation", "mc-stratified"] = "auto",
    index: Literal["auto", "shapley", "semivalue", "banzhaf", "k"] = "auto",
    sizes: str | None = None,
    mc_evals: int = 500_000,
    interactions: bool = False,
    seed: int = 0,
    batch_size: int = 65_536,
    progress: bool = True,
) -> int:
    """Layer Shapley values / semivalues from a trained surrogate.

    Args:
        surrogate_dir: folder written by `layershap train`.
        out: scores JSON to write; the PNGs go next to it.
        method: exact enumeration, Monte Carlo, or auto (exact for n <= 22).
        index: shapley, banzhaf, the pruning-range semivalue over --sizes, or k (the index for K = --sizes);
            auto = what the surrogate's training data cover.
        sizes: removed-layer counts A:B for the pruning-range semivalue (implies --index semivalue), or K for
            --index k (the index for K: marginal contributions with K-1 other layers removed).
        mc_evals: value-function evaluations for Monte Carlo.
        interactions: also compute the pairwise Shapley interaction matrix (exact, n <= 24).
        seed: Monte Carlo seed.
        batch_size: masks per surrogate call.
        progress: show progress bars (for long enumerations).
    """
    from pathlib import Path

    from layershap.pipeline.scores import check_scores_path, score_surrogate
    from layershap.surrogate.checkpoint import load_surrogate

    positive("mc_evals", mc_evals)
    positive("batch_size", batch_size)
    non_negative("seed", seed)
    check_scores_path(Path(out))
    surrogate = load_surrogate(surrogate_dir)
    score_surrogate(surrogate, Path(out), surrogate_dir=Path(surrogate_dir), index=index, sizes=sizes,
                    method=method, mc_evals=mc_evals, interactions=interactions, seed=seed, batch_size=batch_size,
                    progress=None if progress else False)
    return 0
