"""``layershap prune``: write a depth-pruned Hugging Face model (``save_pretrained`` + tokenizer).

The layers to remove: by default the verified plan for ``K`` (``plans.json`` of ``layershap run`` or
``layershap plan``: measured, chosen on validation windows); with ``--by-score`` the ``K`` least important layers
of a scores JSON (ignores how the removed layers interact: usually worse, see README); or named directly.
With ``--heal METHOD`` (``bias``, ``linear``, ``lowrank:R``) each removed span gets a training-free patch fitted
on calibration windows of the dense model (``--text``, ``--windows`` x ``--seq-len``; see ``layershap heal``).

Example:
    $ layershap prune --model gemma-3-270m --plans runs/gemma-3-270m --remove 4 --out pruned-14/
    $ layershap prune --model gemma-3-270m --scores runs/gemma-3-270m/scores.json --remove 4 --by-score --out p/
    $ layershap prune --model ./my-llama --layers 3,7,9 --out my-llama-pruned/
    $ layershap prune --model gemma-3-270m --layers 6,7,8,9 --heal linear --out healed-14/
    $ layershap prune --model ./my-llama --sublayers 3.attn,7.attn,9.mlp --out my-llama-sub/
    $ layershap prune --model ./my-llama --plans runs/llama-sub --remove 6 --out p/  # a --players sublayers run
    $ layershap evaluate --model pruned-14/ --text heldout.txt
"""

from __future__ import annotations

from layershap.core.defaults import HEAL_RIDGE, HEAL_SEQ_LEN, HEAL_WINDOWS
from layershap.core.errors import LayershapError
from layershap.core.load_options import CPU_LOADING, LoadOptions

from .options import non_negative, positive


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
    heal: str | None = None,
    text: str = "builtin",
    windows: int = HEAL_WINDOWS,
    seq_len: int = HEAL_SEQ_LEN,
    seed: int = 0,
    ridge: float = HEAL_RIDGE,
    steps: int = 100,
    lr: float = 1e-4,
    lora_rank: int = 8,
    progress: bool = True,
) -> int:
    """Write a depth-pruned Hugging Face model (healed with --heal METHOD).

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
        heal: heal each removed span training-free: bias (its mean update), linear (ReplaceMe's ridge
            least-squares map) or lowrank:R (that map at rank R); default: no healing.
        text: calibration text of the healing fit: builtin, a .txt/.jsonl file, wikitext2 or c4.
        windows: calibration windows of the healing fit.
        seq_len: tokens per calibration window.
        seed: where the calibration windows are drawn from the text.
        ridge: ridge of the linear fits, relative to the mean activation energy (0: plain least squares).
        steps: distill: training steps (each: one batch of 2 calibration windows).
        lr: distill: AdamW learning rate of the LoRA adapters.
        lora_rank: distill: rank of the LoRA adapters on the kept layers next to each removed span.
        progress: show a progress bar while the calibration activations are collected (distill: trained).
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
    positive("windows", windows)
    positive("seq_len", seq_len)
    non_negative("ridge", ridge)
    positive("steps", steps)
    positive("lora_rank", lora_rank)
    if heal is not None:
        from layershap.pruning.heal import parse_method

        parse_method(heal)  # a bad method fails before the model loads
        if sublayers is not None:
            raise LayershapError("--heal heals removed whole layers; leave it out with --sublayers")
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
        if heal is not None:
            raise LayershapError("--heal heals removed whole layers; a sublayer plan is pruned without it")
        written = save_sublayer_pruned_model(loaded.model, loaded.tokenizer, mask, out, info)
        gone = ", ".join(names[i] for i in removed)
        print(f"removed sublayers {gone} of {blocks} layers' {n} ({source['selection']}); {n - len(removed)} "
              "sublayers left")
    elif heal is None:
        written = save_pruned_model(loaded.model, loaded.tokenizer, mask, out, info)
        print(f"removed layers {removed} of {n} ({source['selection']}); {n - len(removed)} layers left")
    else:
        written = _heal_and_save(loaded, removed, out, info, heal, text, windows, seq_len, seed, ridge, progress,
                                 {"steps": steps, "lr": lr, "lora_rank": lora_rank})
        print(f"removed layers {removed} of {n} ({source['selection']}); {n - len(removed)} layers left")
    remote = json.loads((written / PRUNE_INFO_FILE).read_text())["trust_remote_code"]
    reload = ("AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True): it needs the "
              "custom code saved beside it" if remote else "AutoModelForCausalLM.from_pretrained")
    if remote and game == "sublayers":
        reload = ("AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True): its layers without attention "
                  "or MLP need the custom code saved beside it")
    print(f"wrote {written} (reload with {reload}, or `layershap evaluate --model {written}`)")
    return 0


def _heal_and_save(loaded, removed: list[int], out: str, info: dict, method: str, text: str, windows: int,
                   seq_len: int, seed: int, ridge: float, progress: bool, training: dict):
    """Fit the healing ``method`` on calibration windows of ``text``, then save the healed model to ``out``."""
    from layershap.oracle.prune import check_out_dir
    from layershap.oracle.text import load_text, make_windows
    from layershap.pruning.heal import fit_healing
    from layershap.pruning.heal_save import save_healed_model

    check_out_dir(out)  # refused before the calibration pass
    calib = load_text(text)
    ids = make_windows(loaded.tokenizer, calib.text, windows, seq_len, seed)
    calibration = {"text_id": calib.text_id, "windows": windows, "seq_len": seq_len, "seed": seed}
    if method == "distill":
        from layershap.oracle.layers import find_layers
        from layershap.pruning.distill import distill, save_distilled_model

        n = find_layers(loaded.model).n_layers
        student, record = distill(loaded.model, ids, removed, seed=seed, progress=progress, **training)
        print(f"distilled {record['steps']} steps on {record['calibration_tokens']} calibration tokens in "
              f"{record['seconds']:.1f} s: KL to the dense model {record['kl_before']:.4g} -> {record['kl_after']:.4g}")
        return save_distilled_model(student, loaded.tokenizer, {**record, "calibration": calibration}, removed, n,
                                    out, info)
    healing = fit_healing(loaded.model, ids, removed, method, ridge=ridge, progress=progress)
    healing.extra["calibration"] = calibration
    spans = ", ".join(f"{s.start}..{s.stop - 1} on layer {s.carrier}: {100 * s.explained:.0f}%"
                      for s in healing.spans)
    print(f"healed with {method} on {healing.n_tokens} calibration tokens in {healing.seconds:.1f} s "
          f"(share of each span's update the patch reproduces: {spans})")
    return save_healed_model(loaded.model, loaded.tokenizer, healing, out, info)
