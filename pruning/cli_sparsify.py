"""``layershap sparsify``: prune every decoder layer's linear weights to per-layer budgets and save the model.

Example:
    $ layershap sparsify --model gemma-3-270m --sparsity 0.6 --allocation scores --scores scores.json --out sparse/
    $ layershap sparsify --model gemma-3-270m --sparsity 0.7 --allocation owl --out owl-70/
    $ layershap sparsify --model ./my-llama --sparsity 0.5 --allocation uniform --pattern 2:4 --out llama-24/
    $ layershap evaluate --model sparse/ --text heldout.txt
"""

from __future__ import annotations

import time
from pathlib import Path

from layershap.oracle.errors import LayershapError

INFO_FILE = "layershap_sparsity.json"


def default_scores_path(model: str) -> Path:
    """Where ``layershap run --model M`` leaves its scores: ``runs/<model name>/scores.json``."""
    return Path("runs") / Path(model).name.replace(".gguf", "") / "scores.json"


def check_out_dir(out: Path) -> None:
    """Refuse a file, or a non-empty directory that is not an earlier sparsify output (nothing is overwritten)."""
    if out.exists() and not out.is_dir():
        raise LayershapError(f"--out {out} exists and is not a directory; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not (out / INFO_FILE).exists():
        raise LayershapError(
            f"--out {out} is a non-empty directory that is not a layershap sparsified model; "
            "choose an empty or new directory so nothing there is overwritten"
        )


def check_pattern_target(pattern: str, sparsity: float) -> None:
    """An ``N:M`` pattern fixes the mean sparsity at ``(M - N) / M``; any other target is an error."""
    from .wanda import parse_pattern

    n_of_m = parse_pattern(pattern)
    if n_of_m is not None and abs(n_of_m[0] / n_of_m[1] - sparsity) > 1e-9:
        raise LayershapError(
            f"--pattern {pattern} prunes {n_of_m[0]} of every {n_of_m[1]} weights, a sparsity of "
            f"{n_of_m[0] / n_of_m[1]:g}, but --sparsity is {sparsity}; pass --sparsity {n_of_m[0] / n_of_m[1]:g}"
        )


def sparsify(
    *,
    model: str,
    sparsity: float,
    out: Path,
    allocation: str = "scores",
    scores: Path | None = None,
    lambda_: float = 0.08,
    method: str = "wanda",
    pattern: str = "unstructured",
    text: str = "builtin",
    windows: int = 4,
    seq_len: int = 128,
    seed: int = 0,
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
        lambda_: largest deviation of a layer's sparsity from the target (--lambda; owl and scores).
        method: wanda (|weight| x input norm, per output row) or magnitude (|weight|, per matrix).
        pattern: unstructured, or N:M such as 2:4 (keep N of every M; a non-uniform allocation then gives
            each layer its own n:M with the same mean, OWL's mixed N:M).
        text: calibration text, as for the oracle: builtin, a .txt/.jsonl file, wikitext2 or c4.
        windows: calibration windows (the oracle's default: 4).
        seq_len: tokens per calibration window (the oracle's default: 128).
        seed: seed of the calibration window positions (the oracle's default: 0, so the same windows).
        progress: show a progress bar over the layers.
    """
    from .allocation import check_budget
    from .wanda import METHODS

    started = time.perf_counter()
    check_budget(sparsity, lambda_, allocation)
    if method not in METHODS:
        raise LayershapError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    check_pattern_target(pattern, sparsity)
    out = Path(out)
    check_out_dir(out)
    doc = None
    if allocation == "scores":
        from layershap.surrogate.scores_io import read_scores

        path = Path(scores) if scores is not None else default_scores_path(model)
        if scores is None and not path.is_file():
            raise LayershapError(
                f"--allocation scores needs layer scores: pass --scores S.json (from `layershap shapley`), or run "
                f"`layershap run --model {model}` first (it writes {path}); or use --allocation uniform|owl"
            )
        doc = read_scores(path)
        scores = path
    return _run(model, sparsity, out, allocation, scores, doc, lambda_, method, pattern, text, windows, seq_len,
                seed, progress, started)


def _run(model, sparsity, out, allocation, scores, doc, lam, method, pattern, text, windows, seq_len, seed,
         progress, started) -> int:
    import numpy as np

    from layershap.oracle.layers import LAYER_PATHS, find_layers
    from layershap.oracle.loading import load_model
    from layershap.oracle.text import load_text, make_windows, windows_sha256
    from layershap.surrogate.cli_prune import check_scores_match

    from .allocation import layer_budgets
    from .export_formats import write_formats
    from .sparsify import decoder_linears, owl_outlier_ratios, sparsify_layers

    loaded = load_model(model)
    loaded_at = time.perf_counter()
    calib = load_text(text)
    calib_windows = make_windows(loaded.tokenizer, calib.text, windows, seq_len, seed)
    n_layers = len(decoder_linears(loaded.model))
    values = None
    if allocation == "owl":
        values = owl_outlier_ratios(loaded.model, calib_windows)
    elif allocation == "scores":
        check_scores_match(doc, n_layers, loaded.model_id, loaded.model_hash, str(scores))
        values = np.asarray(doc["scores"], dtype=np.float64)
    budgets = layer_budgets(allocation, n_layers, sparsity, lam, values)
    report = sparsify_layers(loaded.model, calib_windows, budgets, method, pattern, progress)
    pruned_at = time.perf_counter()

    out.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    achieved = [layer["sparsity"] for layer in report["layers"]]
    document = {
        "format": "layershap-sparsity", "format_version": 1,
        "model_id": loaded.model_id, "model_hash": loaded.model_hash, "n_layers": n_layers,
        "layers": list(range(n_layers)), "sparsities": [float(b) for b in budgets], "target": sparsity,
        "lambda": lam if allocation != "uniform" else 0.0, "mean": float(np.mean(budgets)),
        "allocation": allocation,
        "values": None if values is None else [float(v) for v in values],
        "values_kind": {"owl": "OWL outlier ratio (m = 5)", "scores": f"layer scores ({doc and doc.get('index')})"
                        }.get(allocation),
        "source_scores": str(scores) if allocation == "scores" else None,
        "method": method, "pattern": pattern, "achieved_sparsities": achieved,
        "pruned_weights": report["pruned"], "zero_weights": report["zeros"],
        "prunable_weights": report["weights"],
        "calibration": {"text_id": calib.text_id, "windows": windows, "seq_len": seq_len, "seed": seed,
                        "windows_sha256": windows_sha256(calib_windows)},
    }
    model_type = getattr(loaded.model.config, "model_type", "")
    write_formats(out, document, layer_prefix=LAYER_PATHS.get(model_type, "model.layers"), modifier="wanda",
                  pattern=pattern, sequential_target=type(find_layers(loaded.model).layers[0]).__name__)
    print(f"{allocation} allocation, {method}, {pattern}: {report['pruned']:,} of {report['weights']:,} decoder "
          f"linear weights set to zero ({report['zeros']:,} zeros: sparsity {report['sparsity']:.6f}, mean of layers "
          f"{report['mean_layer_sparsity']:.6f}, target {sparsity})")
    for i, (b, a) in enumerate(zip(budgets, achieved)):
        print(f"  layer {i:3d}  budget {b:.4f}  zeros {a:.4f}")
    print(f"wrote {out} in {time.perf_counter() - started:.0f} s (load {loaded_at - started:.0f} s, calibrate and "
          f"prune {pruned_at - loaded_at:.0f} s, save {time.perf_counter() - pruned_at:.0f} s); reload it with "
          f"AutoModelForCausalLM.from_pretrained or `layershap evaluate --model {out}`")
    return 0

