"""``layershap sparsify``: prune every decoder layer's linear weights to per-layer budgets and save the model.

Example:
    $ layershap sparsify --model gemma-3-270m --sparsity 0.6 --allocation scores --scores scores.json --out sparse/
    $ layershap sparsify --model gemma-3-270m --sparsity 0.7 --allocation owl --lambda 0.08 --out owl-70/
    $ layershap sparsify --model ./my-llama --sparsity 0.5 --allocation uniform --pattern 2:4 --out llama-24/
    $ layershap evaluate --model sparse/ --text heldout.txt
"""

from __future__ import annotations

from typing import Literal

from layershap.core.defaults import SPARSIFY_SEQ_LEN, SPARSIFY_WINDOWS
from layershap.core.errors import LayershapError
from layershap.core.load_options import DEFAULT_LOADING, LoadOptions

from .options import non_negative, positive


def sparsify(
    model: str,
    sparsity: float,
    out: str,
    allocation: Literal["uniform", "owl", "scores"] = "scores",
    scores: str | None = None,
    lam: float = 0.08,
    method: Literal["wanda", "magnitude"] = "wanda",
    pattern: str = "unstructured",
    text: str = "builtin",
    windows: int = SPARSIFY_WINDOWS,
    seq_len: int = SPARSIFY_SEQ_LEN,
    seed: int = 0,
    loading: LoadOptions = DEFAULT_LOADING,
    progress: bool = True,
) -> int:
    """Prune the linear weights of every decoder layer to per-layer sparsities and save the model.

    Writes a model that ``AutoModelForCausalLM.from_pretrained(out)`` reloads, plus ``layershap_sparsity.json``
    (budgets and counted zeros per layer), ``sparsity_recipe.yaml`` (llm-compressor) and ``sparsities.txt``.

    Args:
        model: gemma-3-270m (embedded default), a .gguf file, a local model directory or a hub id.
        sparsity: target mean sparsity of the decoder layers' linear weights, in [0, 1), e.g. 0.6.
        out: output directory (new, empty, or an earlier sparsify output).
        allocation: per-layer budgets: uniform, owl (outlier ratios of the calibration activations) or
            scores (layer scores from --scores; more important layers are pruned less).
        scores: scores JSON of `layershap shapley` / `layershap run` (default runs/<model name>/scores.json).
        lam: (--lambda) spread of the layer sparsities: owl spans exactly 2 x lambda (OWL's formula), scores stay
            within lambda of the target.
        method: wanda (|weight| x input norm, per output row) or magnitude (|weight|, per matrix).
        pattern: unstructured, or N:M such as 2:4 (N pruned of every M; a non-uniform allocation then gives
            each layer its own n:M with the same mean, OWL's mixed N:M).
        text: calibration text, as for the oracle: builtin, a .txt/.jsonl file, wikitext2 or c4.
        windows: calibration windows (default 4; the oracle's are 2 x 256 tokens by default).
        seq_len: tokens per calibration window (default 128).
        seed: seed of the calibration window positions (same text, sizes and seed as an oracle run: same windows).
        loading: how to load the model (--device, --dtype, --device-map; the same for every command).
        progress: show a progress bar over the layers.
    """
    from pathlib import Path

    from layershap.pruning.sparsify import check_request, sparsify_model
    from layershap.shapley.scores_io import read_scores

    positive("windows", windows)
    positive("seq_len", seq_len)
    non_negative("seed", seed)
    non_negative("lambda", lam)
    check_request(sparsity, lam, allocation, method, pattern, out)  # before the scores and the model
    record, source = None, None
    if allocation == "scores":
        path = Path(scores) if scores is not None else Path("runs") / Path(model).name.replace(".gguf", "") / (
            "scores.json")
        if scores is None and not path.is_file():
            raise LayershapError(
                f"--allocation scores needs layer scores: pass --scores S.json (from `layershap shapley`), or run "
                f"`layershap run --model {model}` first (it writes {path}); or use --allocation uniform|owl"
            )
        record, source = read_scores(path), str(path)
    done = sparsify_model(model, out, sparsity=sparsity, allocation=allocation, scores=record, scores_source=source,
                          lam=lam, method=method, pattern=pattern, text=text, windows=windows, seq_len=seq_len,
                          seed=seed, loading=loading, progress=progress)
    report, seconds = done.report, done.seconds
    print(f"{allocation} allocation, {method}, {pattern}: {report['pruned']:,} of {report['weights']:,} decoder "
          f"linear weights set to zero ({report['zeros']:,} zeros: sparsity {report['sparsity']:.6f}, mean of layers "
          f"{report['mean_layer_sparsity']:.6f}, target {sparsity})")
    for i, (b, a) in enumerate(zip(done.document["sparsities"], done.document["achieved_sparsities"])):
        print(f"  layer {i:3d}  budget {b:.4f}  zeros {a:.4f}")
    print(f"wrote {out} in {sum(seconds.values()):.0f} s (load {seconds['load']:.0f} s, calibrate and prune "
          f"{seconds['prune']:.0f} s, save {seconds['save']:.0f} s); reload it with "
          f"AutoModelForCausalLM.from_pretrained or `layershap evaluate --model {out}`")
    return 0
