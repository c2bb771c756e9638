"""Per-layer sparsities in the formats other pruners read: layershap JSON, llm-compressor recipe, plain list.

* **JSON** (``layershap-sparsity``): the document of ``layershap export`` (one sparsity per decoder layer,
  target, lambda, source scores), plus, after ``sparsify``, the weights counted as pruned per layer.
* **llm-compressor recipe** (YAML): one ``WandaPruningModifier`` or ``SparseGPTModifier`` whose ``sparsity``
  maps every decoder layer's module name (``model.layers.0`` ...) to its sparsity and whose ``targets`` list
  those same names, so each layer's linear weights get that layer's sparsity; ``lm_head`` is ignored.
* **list**: one sparsity per line, layer 0 first.

llm-compressor itself is not a dependency (it pins older transformers); the recipe is plain YAML.

Example:
    >>> write_recipe("recipe.yaml", [0.62, 0.7, 0.78], layer_prefix="model.layers", modifier="wanda")
    PosixPath('recipe.yaml')
    >>> write_list("sparsities.txt", [0.62, 0.7, 0.78])
    PosixPath('sparsities.txt')
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from layershap.core.errors import LayershapError
from layershap.core.jsonio import write_json

FORMATS = ("json", "llmcompressor", "list")
MODIFIERS = {"wanda": "WandaPruningModifier", "sparsegpt": "SparseGPTModifier"}
FILE_NAMES = {"json": "layershap_sparsity.json", "llmcompressor": "sparsity_recipe.yaml", "list": "sparsities.txt"}


def mask_structure(pattern: str) -> str:
    """llm-compressor's ``mask_structure`` for a pattern: ``0:0`` = unstructured, else ``N:M`` unchanged."""
    return "0:0" if pattern == "unstructured" else pattern


def recipe_document(
    sparsities: Sequence[float],
    layer_prefix: str = "model.layers",
    modifier: str = "wanda",
    pattern: str = "unstructured",
    sequential_target: str | None = None,
) -> dict:
    """The llm-compressor recipe as a dict (``sparsity_stage`` -> ``sparsity_modifiers`` -> modifier).

    ``layer_prefix``: dotted path of the decoder layer list in the model (``model.layers`` for Llama, Qwen,
    Gemma 3 text; ``model.decoder.layers`` for OPT). ``sequential_target``: the decoder layer class name
    (e.g. ``Gemma3DecoderLayer``), written as ``sequential_targets`` when given.

    Example:
        >>> recipe_document([0.6, 0.8])["sparsity_stage"]["sparsity_modifiers"]["WandaPruningModifier"]["sparsity"]
        {'model.layers.0': 0.6, 'model.layers.1': 0.8}
    """
    if modifier not in MODIFIERS:
        raise LayershapError(f"modifier {modifier!r} is not one of {', '.join(MODIFIERS)}")
    names = [f"{layer_prefix}.{i}" for i in range(len(sparsities))]
    args: dict = {
        "sparsity": {name: round(float(s), 6) for name, s in zip(names, sparsities)},
        "mask_structure": mask_structure(pattern),
        "targets": names,
        "ignore": ["re:.*lm_head"],
    }
    if sequential_target:
        args["sequential_targets"] = [sequential_target]
    return {"sparsity_stage": {"sparsity_modifiers": {MODIFIERS[modifier]: args}}}


def write_recipe(path: str | Path, sparsities: Sequence[float], **kwargs) -> Path:
    """Write the llm-compressor recipe YAML (keyword arguments as :func:`recipe_document`)."""
    import yaml

    path = Path(path)
    path.write_text(yaml.safe_dump(recipe_document(sparsities, **kwargs), sort_keys=False))
    return path


def write_list(path: str | Path, sparsities: Sequence[float]) -> Path:
    """Write one sparsity per line (layer 0 first)."""
    path = Path(path)
    path.write_text("".join(f"{float(s):.6f}\n" for s in sparsities))
    return path


def write_formats(out_dir: str | Path, document: dict, formats: Sequence[str] = FORMATS, **recipe_kwargs
                  ) -> list[Path]:
    """Write ``document["sparsities"]`` in every format of ``formats`` into ``out_dir`` (names: FILE_NAMES).

    Example:
        >>> write_formats("out/", export_document(doc, 0.7, 0.08, "scores.json"), layer_prefix="model.layers")  # doctest: +SKIP
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise LayershapError(f"unknown export format(s) {unknown}; use {', '.join(FORMATS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        path = out / FILE_NAMES[fmt]
        if fmt == "json":
            written.append(write_json(path, document))
        elif fmt == "llmcompressor":
            written.append(write_recipe(path, document["sparsities"], **recipe_kwargs))
        else:
            written.append(write_list(path, document["sparsities"]))
    return written
