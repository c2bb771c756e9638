"""``layershap prune``: write a depth-pruned Hugging Face model (``save_pretrained`` + tokenizer).

The layers to remove come from a scores JSON (the ``K`` least important by its ranking) or are named directly.

Example:
    $ layershap prune --model gemma-3-270m --scores runs/default/scores.json --remove 4 --out pruned-14/
    $ layershap prune --model ./my-llama --layers 3,7,9 --out my-llama-pruned/
    $ layershap evaluate --model pruned-14/ --text heldout.txt
"""

from __future__ import annotations

from typing import Literal

from layershap.core.errors import LayershapError

from .options import Device, positive


def prune(
    model: str,
    out: str,
    scores: str | None = None,
    remove: int | None = None,
    layers: list[int] | None = None,
    dtype: Literal["float32", "bfloat16", "float16"] | None = None,
    device: Device = "cpu",
) -> int:
    """Write a depth-pruned Hugging Face model.

    Args:
        model: gemma-3-270m (embedded default), a .gguf file, a local model directory or a hub id.
        out: output directory for the pruned model (new or empty).
        scores: scores JSON of this model (from `layershap shapley` or `layershap run`).
        remove: K: remove the K least important layers of the scores' ranking.
        layers: remove exactly these 0-based layers instead, e.g. 3,7,9 (no scores needed).
        dtype: weights dtype of the saved model (default float32 on CPU, bfloat16 on CUDA).
        device: device to load the model on.
    """
    import torch

    from layershap.core.masks import check_removal_count, masks_from_removed
    from layershap.oracle.identity import check_same_model
    from layershap.oracle.layers import find_layers
    from layershap.oracle.loading import load_model
    from layershap.oracle.prune import save_pruned_model
    from layershap.shapley.scores_io import read_scores

    positive("remove", remove)
    if layers is not None:
        if scores is not None or remove is not None:
            raise LayershapError("give either --layers, or --scores with --remove K, not both")
        if not layers:
            raise LayershapError("--layers names no layer; give 0-based indices like --layers 3,7,9")
    elif scores is None or remove is None:
        raise LayershapError("say which layers to remove: --scores FILE --remove K, or --layers I,J,...")
    record = read_scores(scores) if scores is not None else None  # a bad file fails before the model loads
    loaded = load_model(model, device=device, dtype=getattr(torch, dtype) if dtype else None)
    n = find_layers(loaded.model).n_layers
    if record is None:
        removed, source = sorted(layers), {"selection": "layers given on the command line"}
    else:
        check_same_model(record.identity, {"model_id": loaded.model_id, "model_hash": loaded.model_hash,
                                           "n_layers": n}, what=str(scores),
                         fix="use the scores of this model (or the --dtype they were made with), or name the "
                             "layers with --layers")
        check_removal_count(remove, n)
        removed = sorted(int(i) for i in record.scores.ranking()[:remove])
        source = {
            "selection": f"the {remove} least important layers by {record.scores.index} scores",
            "scores_file": str(scores), "scores_index": record.scores.index,
            "removed_scores": {str(i): float(record.scores.values[i]) for i in removed},
        }
    mask = masks_from_removed(removed, n)[0]
    info = {"model_id": loaded.model_id, "model_hash": loaded.model_hash, **source}
    written = save_pruned_model(loaded.model, loaded.tokenizer, mask, out, info)
    print(f"removed layers {removed} of {n} ({source['selection']}); {n - len(removed)} layers left")
    print(f"wrote {written} (reload with AutoModelForCausalLM.from_pretrained, or `layershap evaluate --model {written}`)")
    return 0
