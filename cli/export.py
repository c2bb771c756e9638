"""``layershap export SCORES``: per-layer sparsity ratios from a scores JSON, for Wanda/SparseGPT-style pruners,
as layershap JSON, an llm-compressor recipe or a plain list.

Example:
    $ layershap export scores.json --sparsity 0.7 --lambda 0.08 --out sparsity.json
    $ layershap export scores.json --sparsity 0.7 --format llmcompressor --out recipe.yaml
    $ layershap export scores.json --sparsity 0.7 --format list --out sparsities.txt
"""

from __future__ import annotations

from typing import Literal

from layershap.core.errors import LayershapError

from .options import non_negative

SUFFIXES = {"json": ".json", "llmcompressor": ".yaml", "list": ".txt"}


def export(
    scores: str,
    sparsity: float,
    lam: float = 0.08,
    format: Literal["json", "llmcompressor", "list"] = "json",
    out: str | None = None,
    layer_prefix: str = "model.layers",
    modifier: Literal["wanda", "sparsegpt"] = "wanda",
    pattern: str = "unstructured",
) -> int:
    """Per-layer sparsity ratios for Wanda/SparseGPT-style pruners (layershap's bounded linear mapping of the scores).

    Args:
        scores: scores JSON written by `layershap shapley` (or `layershap run`).
        sparsity: target mean sparsity in [0, 1), e.g. 0.7.
        lam: (--lambda) largest deviation of a layer's sparsity from the target.
        format: json (layershap-sparsity), llmcompressor (recipe YAML for llm-compressor's Wanda/SparseGPT
            modifiers) or list (one sparsity per line, layer 0 first).
        out: output file (default beside the scores: <scores stem>.sparsity-<target>.json|.yaml|.txt).
        layer_prefix: module path of the decoder layer list, for the recipe (model.layers for Llama, Qwen,
            Gemma; model.decoder.layers for OPT).
        modifier: recipe modifier: wanda (WandaPruningModifier) or sparsegpt (SparseGPTModifier).
        pattern: recipe mask structure: unstructured or N:M such as 2:4.
    """
    from pathlib import Path

    from layershap.core.jsonio import write_json
    from layershap.pruning.allocation import check_budget
    from layershap.pruning.export_formats import FORMATS, MODIFIERS, write_list, write_recipe
    from layershap.pruning.sparsity import export_document
    from layershap.pruning.wanda import parse_pattern
    from layershap.shapley.scores_io import read_scores

    non_negative("lambda", lam)
    if format not in FORMATS:
        raise LayershapError(f"--format {format!r} is not one of {', '.join(FORMATS)}")
    if modifier not in MODIFIERS:
        raise LayershapError(f"--modifier {modifier!r} is not one of {', '.join(MODIFIERS)}")
    check_budget(sparsity, lam, "scores")
    parse_pattern(pattern)
    record = read_scores(scores)
    out_doc = export_document(record, sparsity, lam, str(scores))
    path = Path(out) if out else Path(scores).with_name(f"{Path(scores).stem}.sparsity-{sparsity:g}{SUFFIXES[format]}")
    ratios = out_doc["sparsities"]
    if format == "json":
        write_json(path, out_doc)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        if format == "list":
            write_list(path, ratios)
        else:
            write_recipe(path, ratios, layer_prefix=layer_prefix, modifier=modifier, pattern=pattern)
    print(f"{len(ratios)} layers, mean sparsity {out_doc['mean']:.6f} (target {sparsity}), "
          f"range {min(ratios):.4f} .. {max(ratios):.4f}")
    for i, (s, r) in enumerate(zip(out_doc["scores"], ratios)):
        print(f"  layer {i:3d}  score {s:+.5f}  sparsity {r:.4f}")
    print(f"wrote {path}")
    return 0
