"""``layershap export`` as a typed command: per-layer sparsities from a scores JSON in json, llm-compressor or list form.

Example:
    $ layershap export scores.json --sparsity 0.7 --lambda 0.08 --format llmcompressor --out recipe.yaml
    $ layershap export scores.json --sparsity 0.7 --format list --out sparsities.txt
"""

from __future__ import annotations

from pathlib import Path

from layershap.oracle.errors import LayershapError


def export(
    scores: Path,
    *,
    sparsity: float,
    lambda_: float = 0.08,
    format: str = "json",
    out: Path | None = None,
    layer_prefix: str = "model.layers",
    modifier: str = "wanda",
    pattern: str = "unstructured",
) -> int:
    """Per-layer sparsities for Wanda/SparseGPT-style pruners from layer scores (mean exactly the target).

    Args:
        scores: scores JSON written by `layershap shapley` or `layershap run`.
        sparsity: target mean sparsity in [0, 1), e.g. 0.7.
        lambda_: largest deviation of a layer's sparsity from the target (--lambda).
        format: json (layershap-sparsity), llmcompressor (recipe YAML for llm-compressor's Wanda/SparseGPT
            modifiers) or list (one sparsity per line).
        out: output file (default beside the scores: <stem>.sparsity-<target>.json|.yaml|.txt).
        layer_prefix: module path of the decoder layer list, for the recipe (model.layers for Llama, Qwen,
            Gemma; model.decoder.layers for OPT).
        modifier: recipe modifier: wanda (WandaPruningModifier) or sparsegpt (SparseGPTModifier).
        pattern: recipe mask structure: unstructured or N:M such as 2:4.
    """
    from layershap.surrogate.cli_export import export_document
    from layershap.surrogate.scores_io import read_scores

    from .allocation import check_budget
    from .export_formats import FORMATS, write_json, write_list, write_recipe
    from .wanda import parse_pattern

    if format not in FORMATS:
        raise LayershapError(f"--format {format!r} is not one of {', '.join(FORMATS)}")
    check_budget(sparsity, lambda_, "scores")
    parse_pattern(pattern)
    doc = read_scores(scores)
    document = export_document(doc, sparsity, lambda_, str(scores))
    suffix = {"json": ".json", "llmcompressor": ".yaml", "list": ".txt"}[format]
    path = Path(out) if out else Path(scores).with_name(f"{Path(scores).stem}.sparsity-{sparsity:g}{suffix}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "json":
        write_json(path, document)
    elif format == "list":
        write_list(path, document["sparsities"])
    else:
        write_recipe(path, document["sparsities"], layer_prefix=layer_prefix, modifier=modifier, pattern=pattern)
    ratios = document["sparsities"]
    print(f"{len(ratios)} layers, mean sparsity {document['mean']:.6f} (target {sparsity}), "
          f"range {min(ratios):.4f} .. {max(ratios):.4f}; wrote {path}")
    return 0
