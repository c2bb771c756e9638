"""``layershap export SCORES``: per-layer sparsity ratios from a scores JSON, for Wanda/SparseGPT-style pruners.

Example:
    $ layershap export scores.json --sparsity 0.7 --lambda 0.08 --out sparsity.json
"""

from __future__ import annotations

from .options import non_negative


def export(scores: str, sparsity: float, lam: float = 0.08, out: str | None = None) -> int:
    """Per-layer sparsity ratios for Wanda/SparseGPT-style pruners (OWL-style bounded mapping of the scores).

    Args:
        scores: scores JSON written by `layershap shapley` (or `layershap run`).
        sparsity: target mean sparsity in [0, 1), e.g. 0.7.
        lam: (--lambda) largest deviation of a layer's sparsity from the target.
        out: output JSON (default: <scores stem>.sparsity-<target>.json beside the scores).
    """
    from pathlib import Path

    from layershap.core.jsonio import write_json
    from layershap.pruning.sparsity import export_document
    from layershap.shapley.scores_io import read_scores

    non_negative("lambda", lam)
    record = read_scores(scores)
    out_doc = export_document(record, sparsity, lam, str(scores))
    path = Path(out) if out else Path(scores).with_name(f"{Path(scores).stem}.sparsity-{sparsity:g}.json")
    write_json(path, out_doc)
    ratios = out_doc["sparsities"]
    print(f"{len(ratios)} layers, mean sparsity {out_doc['mean']:.6f} (target {sparsity}), "
          f"range {min(ratios):.4f} .. {max(ratios):.4f}")
    for i, (s, r) in enumerate(zip(out_doc["scores"], ratios)):
        print(f"  layer {i:3d}  score {s:+.5f}  sparsity {r:.4f}")
    print(f"wrote {path}")
    return 0
