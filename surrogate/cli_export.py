"""``layershap export``: per-layer sparsity ratios from a scores JSON, for Wanda/SparseGPT-style pruners.

Example:
    $ layershap export scores.json --sparsity 0.7 --lambda 0.08 --out sparsity.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scores", help="scores JSON written by `layershap shapley` (or `layershap run`)")
    parser.add_argument("--sparsity", type=float, required=True, help="target mean sparsity, e.g. 0.7")
    parser.add_argument("--lambda", dest="lam", type=float, default=0.08,
                        help="largest deviation of a layer's sparsity from the target (default 0.08)")
    parser.add_argument("--out", default=None,
                        help="output JSON (default: <scores stem>.sparsity-<target>.json beside the scores)")


def export_document(doc: dict, target: float, lam: float, source: str) -> dict:
    """The sparsity JSON for a scores document of :func:`layershap.surrogate.scores_io.read_scores`.

    Example:
        >>> export_document(read_scores("scores.json"), 0.7, 0.08, "scores.json")["sparsities"]
    """
    import numpy as np

    from .sparsity import owl_sparsities

    scores = np.asarray(doc["scores"], dtype=np.float64)
    ratios = owl_sparsities(scores, target, lam)
    return {
        "format": "layershap-sparsity",
        "format_version": 1,
        "model_id": doc.get("model_id"),
        "model_hash": doc.get("model_hash"),
        "n_layers": int(doc["n_layers"]),
        "layers": list(range(int(doc["n_layers"]))),
        "sparsities": [float(x) for x in ratios],
        "target": target,
        "lambda": lam,
        "mean": float(ratios.mean()),
        "mapping": "OWL-style bounded linear: higher score -> lower sparsity, within [target-lambda, target+lambda]",
        "index": doc.get("index"),
        "method": doc.get("method"),
        "scores": [float(x) for x in scores],
        "source_scores": source,
    }


def run(args: argparse.Namespace) -> int:
    from .scores_io import read_scores

    doc = read_scores(args.scores)
    out_doc = export_document(doc, args.sparsity, args.lam, str(args.scores))
    out = Path(args.out) if args.out else Path(args.scores).with_name(
        f"{Path(args.scores).stem}.sparsity-{args.sparsity:g}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(out_doc, indent=2) + "\n")
    ratios = out_doc["sparsities"]
    print(f"{len(ratios)} layers, mean sparsity {out_doc['mean']:.6f} (target {args.sparsity}), "
          f"range {min(ratios):.4f} .. {max(ratios):.4f}")
    for i, (s, r) in enumerate(zip(out_doc["scores"], ratios)):
        print(f"  layer {i:3d}  score {s:+.5f}  sparsity {r:.4f}")
    print(f"wrote {out}")
    return 0
