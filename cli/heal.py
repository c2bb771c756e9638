"""``layershap heal``: write a depth-pruned model healed training-free (``layershap prune --heal METHOD``).

Each removed contiguous span gets a patch fitted in closed form on the dense model's activations on calibration
windows, carried by the kept layer before the span: ``bias`` (the span's mean update), ``linear`` (ReplaceMe's
ridge least-squares map of that layer's MLP output) or ``lowrank:R``. Llama, Mistral, Qwen 2/3 and Phi-3 get
``linear`` / ``lowrank:R`` (Llama also ``bias``) fused into ``down_proj``: a standard folder; Gemma 2/3 and the
other cases are saved with custom code (``trust_remote_code=True``), which layershap reloads by itself.
``distill`` trains LoRA adapters (peft) on the kept layers next to each span to match the dense model's next-token
distributions (KL) for ``--steps`` steps and merges them: a standard folder on every architecture.

Example:
    $ layershap heal --model gemma-3-270m --layers 6,7,8,9 --method linear --out healed-14/
    $ layershap heal --model gemma-3-270m --plans runs/gemma-3-270m --remove 4 --method lowrank:64 --out h/
    $ layershap heal --model gemma-3-270m --layers 7,8 --method distill --steps 200 --lr 2e-4 --out d/
    $ layershap evaluate --model healed-14/ --text heldout.txt
"""

from __future__ import annotations

from layershap.core.defaults import HEAL_RIDGE, HEAL_SEQ_LEN, HEAL_WINDOWS
from layershap.core.load_options import CPU_LOADING, LoadOptions

from .prune import prune


def heal(
    model: str,
    out: str,
    method: str = "linear",
    remove: int | None = None,
    plans: str | None = None,
    scores: str | None = None,
    by_score: bool = False,
    layers: list[int] | None = None,
    text: str = "builtin",
    windows: int = HEAL_WINDOWS,
    seq_len: int = HEAL_SEQ_LEN,
    seed: int = 0,
    ridge: float = HEAL_RIDGE,
    steps: int = 100,
    lr: float = 1e-4,
    lora_rank: int = 8,
    progress: bool = True,
    loading: LoadOptions = CPU_LOADING,
) -> int:
    """Write a depth-pruned Hugging Face model with each removed span healed training-free.

    Args:
        model: gemma-3-270m (embedded default), a .gguf file, a local model directory or a hub id.
        out: output directory for the healed model (new or empty).
        method: bias (each span's mean update), linear (ReplaceMe's ridge least-squares map), lowrank:R, or
            distill (LoRA on the layers next to each span, trained on KL to the dense model, merged).
        remove: K: how many layers to remove (the verified plan for K, or with --by-score the K lowest scores).
        plans: plans.json (or the folder holding it) of `layershap run` / `layershap plan` for this model.
        scores: scores JSON of this model, for --by-score.
        by_score: remove the K least important layers of the scores' ranking instead of the verified plan.
        layers: remove exactly these 0-based layers instead, e.g. 6,7,8,9 (layer 0 must stay).
        text: calibration text of the fit: builtin, a .txt/.jsonl file, wikitext2 or c4.
        windows: calibration windows of the fit.
        seq_len: tokens per calibration window.
        seed: where the calibration windows are drawn from the text.
        ridge: ridge of the linear fits, relative to the mean activation energy (0: plain least squares).
        steps: distill: training steps (each: one batch of 2 calibration windows).
        lr: distill: AdamW learning rate of the LoRA adapters.
        lora_rank: distill: rank of the LoRA adapters on the kept layers next to each removed span.
        progress: show a progress bar while the calibration activations are collected.
        loading: how to load the model (--device, default cpu; --dtype: the dtype of the saved model;
            --device-map: shard a model larger than the host memory over the GPUs).
    """
    return prune(model, out, remove=remove, plans=plans, scores=scores, by_score=by_score, layers=layers,
                 loading=loading, heal=method, text=text, windows=windows, seq_len=seq_len, seed=seed, ridge=ridge,
                 steps=steps, lr=lr, lora_rank=lora_rank, progress=progress)
