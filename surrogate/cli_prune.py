"""``layershap prune``: write a depth-pruned Hugging Face model (``save_pretrained`` + tokenizer).

The layers to remove come from a scores JSON (the ``K`` least important by its ranking) or are named directly.

Example:
    $ layershap prune --model gemma-3-270m --scores runs/default/scores.json --remove 4 --out pruned-14/
    $ layershap prune --model ./my-llama --layers 3,7,9 --out my-llama-pruned/
    $ layershap evaluate --model pruned-14/ --text heldout.txt
"""

from __future__ import annotations

import argparse

from layershap.oracle.cli_oracle import positive_int
from layershap.oracle.errors import LayershapError

DTYPES = ("float32", "bfloat16", "float16")


def layer_list(text: str) -> list[int]:
    """argparse type: comma-separated 0-based layer indices, e.g. ``3,7,9``."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 3,7,9; got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("name at least one layer index")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="gemma-3-270m (embedded default), a .gguf file, a local model directory or a hub id")
    parser.add_argument("--scores", default=None, help="scores JSON of this model (from `layershap shapley`)")
    parser.add_argument("--remove", type=positive_int, default=None, metavar="K",
                        help="remove the K least important layers of the scores' ranking")
    parser.add_argument("--layers", type=layer_list, default=None, metavar="I,J,...",
                        help="remove exactly these 0-based layers instead (no scores needed)")
    parser.add_argument("--out", required=True, help="output directory for the pruned model (new or empty)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="weights dtype of the saved model (default float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                        help="device to load the model on (default cpu)")


def check_scores_match(doc: dict, n_layers: int, model_id: str, model_hash: str, source: str) -> None:
    """Refuse a scores document made for another model (layer count, content hash or id differ).

    Example:
        >>> check_scores_match(read_scores("scores.json"), 18, lm.model_id, lm.model_hash, "scores.json")
    """
    if int(doc["n_layers"]) != n_layers:
        raise LayershapError(
            f"{source} scores a {doc['n_layers']}-layer model but {model_id} has {n_layers} decoder layers; "
            "use the scores computed for this model (or name the layers with --layers)"
        )
    if doc.get("model_hash") and model_hash and doc["model_hash"] != model_hash:
        raise LayershapError(
            f"{source} was computed for model {doc.get('model_id')!r} (hash {str(doc['model_hash'])[:12]}...) but "
            f"{model_id!r} has hash {model_hash[:12]}...; these are different models (or the same checkpoint "
            "loaded in another dtype: pass the dtype the scores were made with, --dtype). "
            "Use the scores of this model, or name the layers with --layers"
        )
    if not (doc.get("model_hash") and model_hash) and doc.get("model_id") and doc["model_id"] != model_id:
        raise LayershapError(
            f"{source} was computed for model {doc['model_id']!r}, not {model_id!r}; "
            "use the scores of this model, or name the layers with --layers"
        )


def choose_layers(args: argparse.Namespace, n_layers: int, model_id: str, model_hash: str) -> tuple[list[int], dict]:
    """The layers to remove and a record of where they came from (for ``layershap_prune.json``)."""
    if args.layers is not None:
        if args.scores is not None or args.remove is not None:
            raise LayershapError("give either --layers, or --scores with --remove K, not both")
        return sorted(args.layers), {"selection": "layers given on the command line"}
    if args.scores is None or args.remove is None:
        raise LayershapError("say which layers to remove: --scores FILE --remove K, or --layers I,J,...")
    from .scores_io import read_scores

    doc = read_scores(args.scores)
    check_scores_match(doc, n_layers, model_id, model_hash, str(args.scores))
    if args.remove >= n_layers:
        raise LayershapError(f"--remove {args.remove} would remove every layer; {model_id} has {n_layers}")
    removed = sorted(int(i) for i in doc["ranking"][: args.remove])
    scores = doc["scores"]
    return removed, {
        "selection": f"the {args.remove} least important layers by {doc.get('index')} scores",
        "scores_file": str(args.scores),
        "scores_index": doc.get("index"),
        "removed_scores": {str(i): scores[i] for i in removed},
    }


def run(args: argparse.Namespace) -> int:
    import torch

    from layershap.oracle.layers import find_layers
    from layershap.oracle.loading import load_model
    from layershap.oracle.prune import mask_from_removed, save_pruned_model

    dtype = getattr(torch, args.dtype) if args.dtype else None
    loaded = load_model(args.model, device=args.device, dtype=dtype)
    n = find_layers(loaded.model).n_layers
    removed, source = choose_layers(args, n, loaded.model_id, loaded.model_hash)
    mask = mask_from_removed(n, removed)
    if not mask.any():
        raise LayershapError(f"removing layers {removed} would leave none of the {n} layers")
    info = {"model_id": loaded.model_id, "model_hash": loaded.model_hash, **source}
    out = save_pruned_model(loaded.model, loaded.tokenizer, mask, args.out, info)
    print(f"removed layers {removed} of {n} ({source['selection']}); {n - len(removed)} layers left")
    print(f"wrote {out} (reload with AutoModelForCausalLM.from_pretrained, or `layershap evaluate --model {out}`)")
    return 0
