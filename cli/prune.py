"""``layershap prune``: write a depth-pruned Hugging Face model (``save_pretrained`` + tokenizer).

The layers to remove: by default the verified plan for ``K`` (``plans.json`` of ``layershap run`` or
``layershap plan``: measured, chosen on validation windows); with ``--by-score`` the ``K`` least important layers
of a scores JSON (ignores how the removed layers interact: usually worse, see README); or named directly.

Example:
    $ layershap prune --model gemma-3-270m --plans runs/gemma-3-270m --remove 4 --out pruned-14/
    $ layershap prune --model gemma-3-270m --scores runs/gemma-3-270m/scores.json --remove 4 --by-score --out p/
    $ layershap prune --model ./my-llama --layers 3,7,9 --out my-llama-pruned/
    $ layershap prune --model ./my-llama --sublayers 3.attn,7.attn,9.mlp --out my-llama-sub/
    $ layershap prune --model ./my-llama --plans runs/llama-sub --remove 6 --out p/  # a --players sublayers run
    $ layershap evaluate --model pruned-14/ --text heldout.txt
"""

from __future__ import annotations

from layershap.core.errors import LayershapError
from layershap.core.load_options import CPU_LOADING, LoadOptions

from .options import positive


def prune(
    model: str,
    out: str,
    remove: int | None = None,
    plans: str | None = None,
    scores: str | None = None,
    by_score: bool = False,
    layers: list[int] | None = None,
    sublayers: str | None = None,
    loading: LoadOptions = CPU_LOADING,
) -> int:
    """Write a depth-pruned Hugging Face model.

    Args:
        model: gemma-3-270m (embedded default), a .gguf file, a local model directory or a hub id.
        out: output directory for the pruned model (new or empty).
        remove: K: how many layers to remove (the verified plan for K, or with --by-score the K lowest scores).
        plans: plans.json (or the folder holding it) of `layershap run` / `layershap plan` for this model;
            default: the plans.json next to --scores.
        scores: scores JSON of this model (from `layershap shapley` or `layershap run`), for --by-score.
        by_score: remove the K least important layers of the scores' ranking instead of the verified plan.
        layers: remove exactly these 0-based layers instead, e.g. 3,7,9 (no scores needed).
        sublayers: remove exactly these attention / MLP sublayers, e.g. 3.attn,7.attn,9.mlp; a layer keeping
            one of its two is saved with custom code (reload with trust_remote_code=True).
        loading: how to load the model (--device, default cpu; --dtype: the dtype of the saved model;
            --device-map: for a model larger than the host memory, shard it over the GPUs).
    """
    import json
    from pathlib import Path

    from layershap.core.masks import check_removal_count, masks_from_removed
    from layershap.oracle.identity import check_same_model
    from layershap.oracle.layers import find_layers
    from layershap.oracle.loading import load_model
    from layershap.oracle.prune import PRUNE_INFO_FILE, save_pruned_model, save_sublayer_pruned_model
    from layershap.oracle.sublayers import player_names
    from layershap.pipeline.plans import plan_for, read_plans
    from layershap.shapley.scores_io import read_scores

    positive("remove", remove)
    if sublayers is not None:  # the names are checked against the model once it is loaded
        if layers is not None or remove is not None or plans is not None or scores is not None or by_score:
            raise LayershapError("give either --sublayers, or --remove K (with --plans, or --scores and --by-score)")
    elif layers is not None:
        if scores is not None or remove is not None or plans is not None or by_score:
            raise LayershapError("give either --layers, or --remove K (with --plans, or --scores and --by-score)")
        if not layers:
            raise LayershapError("--layers names no layer; give 0-based indices like --layers 3,7,9")
    elif remove is None:
        raise LayershapError("say which layers to remove: --remove K with --plans PLANS (or --scores S "
                             "--by-score), or --layers I,J,...")
    elif by_score and scores is None:
        raise LayershapError("--by-score needs the scores file: --scores runs/NAME/scores.json")
    elif not by_score and plans is None:
        if scores is None:
            raise LayershapError("--remove K takes the verified plan from --plans runs/NAME (plans.json); or prune "
                                 "by score with --scores FILE --by-score")
        plans = str(Path(scores).parent)
    # bad files fail before the model loads
    record = read_scores(scores) if by_score else None
    plan_doc = read_plans(plans) if plans is not None and not by_score else None
    game = "sublayers" if sublayers is not None or (plan_doc or {}).get("game") == "sublayers" else "blocks"
    loaded = load_model(model, **loading.as_kwargs())
    blocks = find_layers(loaded.model).n_layers
    names = player_names(blocks) if game == "sublayers" else [str(i) for i in range(blocks)]
    n = len(names)
    current = {"model_id": loaded.model_id, "model_hash": loaded.model_hash, "n_layers": n}
    if sublayers is not None:
        wanted = [name.strip() for name in sublayers.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in names]
        if unknown or not wanted:
            raise LayershapError(f"--sublayers names {', '.join(unknown) or 'nothing'}: give names like 3.attn,7.mlp "
                                 f"(layers 0..{blocks - 1})")
        removed, source = sorted({names.index(name) for name in wanted}), {
            "selection": "sublayers given on the command line"}
    elif layers is not None:
        removed, source = sorted(layers), {"selection": "layers given on the command line"}
    elif plan_doc is not None:
        check_same_model({k: plan_doc.get(k) for k in current}, current, what=str(plans),
                         fix="use the plans of this model, or name the layers with --layers")
        check_removal_count(remove, n)
        removed = sorted(plan_for(plan_doc, remove))
        chosen = next(p for p in plan_doc["plans"] if int(p["k"]) == remove)
        decided = chosen.get("decision_perplexity")
        source = {"selection": f"the verified plan for K = {remove} (calibration perplexity "
                               f"{chosen['perplexity']:.4g}, decision windows "
                               f"{'-' if decided is None else format(decided, '.4g')})",
                  "plans_file": str(plans), "plan": chosen}
    else:
        check_same_model(record.identity, current, what=str(scores),
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
    if game == "sublayers":
        written = save_sublayer_pruned_model(loaded.model, loaded.tokenizer, mask, out, info)
        gone = ", ".join(names[i] for i in removed)
        print(f"removed sublayers {gone} of {blocks} layers' {n} ({source['selection']}); {n - len(removed)} "
              "sublayers left")
    else:
        written = save_pruned_model(loaded.model, loaded.tokenizer, mask, out, info)
        print(f"removed layers {removed} of {n} ({source['selection']}); {n - len(removed)} layers left")
    remote = json.loads((written / PRUNE_INFO_FILE).read_text())["trust_remote_code"]
    reload = ("AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True): its layer pattern needs the "
              "custom code saved beside it" if remote else "AutoModelForCausalLM.from_pretrained")
    if remote and game == "sublayers":
        reload = ("AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True): its layers without attention "
                  "or MLP need the custom code saved beside it")
    print(f"wrote {written} (reload with {reload}, or `layershap evaluate --model {written}`)")
    return 0
