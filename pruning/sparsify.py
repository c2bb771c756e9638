"""Prune the linear weights of every decoder layer to per-layer budgets, calibrated layer by layer (Wanda).

Wanda (and OWL) prune sequentially: layer ``i`` is scored on the inputs it receives from the already pruned
layers ``0..i-1``. :func:`sparsify_layers` does that in one forward pass of all calibration windows: a
pre-hook on each linear weight accumulates the squared norms of its inputs; when decoder layer ``i``
finishes, a forward hook prunes its weights and recomputes its output with the pruned weights, and that
output is what layer ``i + 1`` sees. Embeddings, the LM head and norms are never pruned (Gemma ties the LM head
to the embedding).

Example:
    >>> windows = make_windows(tokenizer, load_text("builtin").text, 16, 128, seed=0)  # doctest: +SKIP
    >>> ratios = owl_outlier_ratios(model, windows)                       # dense pass, one per layer  # doctest: +SKIP
    >>> budgets = layer_budgets("owl", len(ratios), 0.7, 0.08, ratios)  # doctest: +SKIP
    >>> report = sparsify_layers(model, windows, budgets, method="wanda", pattern="unstructured")  # doctest: +SKIP
    >>> report["sparsity"]                                                # counted zeros / weights  # doctest: +SKIP
    >>> sparsify_model("gemma-3-270m", "sparse/", sparsity=0.7, allocation="owl").report["sparsity"]  # doctest: +SKIP

:func:`sparsify_model` is the whole of ``layershap sparsify`` as a library call: check the request, load,
calibrate, allocate, prune, save the model and the budgets in every export format. Over 300 lines: the layer
pass and its model-level entry stay together, so one module holds the whole of sparsify.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from layershap.core.defaults import SPARSIFY_SEQ_LEN, SPARSIFY_WINDOWS
from layershap.core.errors import LayershapError, UnsupportedModelError
from layershap.core.load_options import DEFAULT_LOADING, LoadOptions
from layershap.oracle.layers import LAYER_PATHS, find_layers
from layershap.shapley.scores_io import ScoresRecord

from .allocation import OWL_M, check_budget, group_counts, layer_budgets, outlier_ratio, zero_counts
from .export_formats import FILE_NAMES, write_formats
from .wanda import (
    METHODS,
    apportion,
    magnitude_metric,
    parse_pattern,
    select_n_of_m,
    select_unstructured,
    wanda_metric,
)

Linears = list[tuple[str, nn.Linear]]


def decoder_linears(model: nn.Module) -> list[Linears]:
    """Per decoder layer, its ``nn.Linear`` modules as ``(name inside the layer, module)``.

    Example:
        >>> [name for name, _ in decoder_linears(model)[0]]  # doctest: +SKIP
        ['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj', 'mlp.gate_proj', ...]
    """
    out = []
    for i, layer in enumerate(find_layers(model).layers):
        linears = [(name, module) for name, module in layer.named_modules() if isinstance(module, nn.Linear)]
        if not linears:
            raise UnsupportedModelError(
                f"decoder layer {i} ({type(layer).__name__}) has no torch.nn.Linear weights (GPT-2 style Conv1D "
                "layers are not supported); sparsify supports Llama, Mistral, Qwen, Gemma, Phi-3, OPT, GPT-NeoX"
            )
        out.append(linears)
    return out


class _InputNorms:
    """Forward pre-hooks accumulating ``sum over tokens of x^2`` per input feature of each linear."""

    def __init__(self, linears: list[Linears]) -> None:
        self.sq: dict[nn.Module, torch.Tensor] = {}
        self.active = True
        self._last: tuple = (None, None)
        self.handles = [module.register_forward_pre_hook(self._hook) for layer in linears for _, module in layer]

    def _hook(self, module: nn.Module, args: tuple) -> None:
        if not self.active:
            return
        if args[0] is not self._last[0]:  # q/k/v (and gate/up) read the same tensor: square it once
            self._last = (args[0], args[0].detach().float().reshape(-1, args[0].shape[-1]).pow(2).sum(dim=0))
        sq = self._last[1]
        self.sq[module] = self.sq[module] + sq if module in self.sq else sq

    def remove(self) -> None:
        self._last = (None, None)
        for handle in self.handles:
            handle.remove()


def _calibration_forward(model: nn.Module, windows: np.ndarray) -> None:
    """One forward pass of all windows through the decoder (no LM head: its logits are not needed)."""
    device = next(model.parameters()).device
    ids = torch.as_tensor(np.asarray(windows), dtype=torch.long, device=device)
    body = getattr(model, "base_model", model)
    with torch.no_grad():
        body(input_ids=ids, use_cache=False)


def owl_outlier_ratios(model: nn.Module, windows: np.ndarray, m: float = OWL_M) -> np.ndarray:
    """OWL outlier ratio of every decoder layer on the dense model: ``float64[n_layers]``.

    A layer's ratio is the fraction of the Wanda scores of all its linear weights above ``m`` times their mean.

    Example:
        >>> owl_outlier_ratios(model, windows).round(4)  # doctest: +SKIP
    """
    linears = decoder_linears(model)
    norms = _InputNorms(linears)
    try:
        _calibration_forward(model, windows)
    finally:
        norms.remove()
    ratios = []
    for layer in linears:
        metric = torch.cat([wanda_metric(module.weight, norms.sq[module]).reshape(-1) for _, module in layer])
        ratios.append(outlier_ratio(metric, m))
    return np.asarray(ratios, dtype=np.float64)


def _prune_layer(layer: Linears, norms: dict, method: str, count: int | None, n_of_m: tuple[int, int] | None
                 ) -> list[dict]:
    """Zero the chosen weights of one decoder layer: ``count`` in all (unstructured) or ``n`` of every ``m``."""
    sizes = np.array([module.weight.numel() for _, module in layer], dtype=np.float64)
    if n_of_m is None:
        shares = apportion(sizes * count / sizes.sum(), count)
    records = []
    with torch.no_grad():
        for j, (name, module) in enumerate(layer):
            weight = module.weight
            metric = wanda_metric(weight, norms[module]) if method == "wanda" else magnitude_metric(weight)
            if n_of_m is None:
                pruned = select_unstructured(metric, int(shares[j]), per_row=method == "wanda")
            else:
                pruned = select_n_of_m(metric, n_of_m[0], n_of_m[1])
            weight.masked_fill_(pruned.to(weight.device), 0.0)
            records.append({"module": name, "weights": int(weight.numel()), "pruned": int(pruned.sum()),
                            "zeros": int((weight == 0).sum())})
    return records


def plan_counts(linears: list[Linears], budgets: np.ndarray, pattern: str) -> list[int]:
    """Per layer: weights to prune (unstructured) or weights pruned per group of M (``N:M``)."""
    n_of_m = parse_pattern(pattern)
    if n_of_m is None:
        sizes = np.array([sum(module.weight.numel() for _, module in layer) for layer in linears])
        return [int(c) for c in zero_counts(budgets, sizes)]
    return [int(c) for c in group_counts(budgets, n_of_m[1])]


def sparsify_layers(
    model: nn.Module,
    windows: np.ndarray | None,
    budgets: np.ndarray,
    method: str = "wanda",
    pattern: str = "unstructured",
    progress: bool = True,
) -> dict:
    """Prune ``model`` in place to per-layer ``budgets`` and return what was pruned, counted.

    ``method="wanda"`` needs calibration ``windows`` (``int64[W, L]``) and prunes sequentially (module
    docstring); ``"magnitude"`` ignores them. ``pattern``: ``unstructured`` (each layer loses exactly its
    budget times its weights, rounded to whole weights with the total kept) or ``N:M`` (a mixed N:M when the
    budgets differ: each layer prunes its rounded share of every ``M``).

    Example:
        >>> sparsify_layers(model, windows, np.full(18, 0.6))["layers"][0]["sparsity"]  # doctest: +SKIP
        0.6
    """
    if method not in METHODS:
        raise LayershapError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    linears = decoder_linears(model)
    budgets = np.asarray(budgets, dtype=np.float64)
    if budgets.shape != (len(linears),):
        raise LayershapError(f"{budgets.size} budgets for {len(linears)} decoder layers")
    n_of_m = parse_pattern(pattern)
    counts = plan_counts(linears, budgets, pattern)
    records: list[list[dict]] = [[] for _ in linears]

    def prune(i: int, norms: dict) -> None:
        spec = None if n_of_m is None else (counts[i], n_of_m[1])
        if spec is not None and spec[0] == 0:
            records[i] = [{"module": n, "weights": int(m.weight.numel()), "pruned": 0,
                           "zeros": int((m.weight == 0).sum())} for n, m in linears[i]]
            return
        records[i] = _prune_layer(linears[i], norms, method, counts[i] if spec is None else None, spec)

    if method == "magnitude":
        for i in range(len(linears)):
            prune(i, {})
    else:
        if windows is None:
            raise LayershapError("Wanda needs calibration windows; pass the windows or use method='magnitude'")
        _sequential_pass(model, linears, windows, prune, progress)
    return _report(records, budgets, counts, method, pattern)


def _sequential_pass(model: nn.Module, linears: list[Linears], windows: np.ndarray,
                     prune: Callable[[int, dict], None], progress: bool) -> None:
    from tqdm.auto import tqdm

    layers = find_layers(model).layers
    norms = _InputNorms(linears)
    bar = tqdm(total=len(layers), desc="pruning layers", unit="layer", disable=not progress)
    state = {"recomputing": False, "done": 0}

    def make_hook(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output):
            if state["recomputing"]:
                return None
            prune(i, norms.sq)
            state["done"] += 1
            bar.update(1)
            if i == len(layers) - 1:
                return None  # nothing after the last layer is pruned: its output is not needed
            state["recomputing"], norms.active = True, False
            try:
                with torch.no_grad():
                    return module(*args, **kwargs)
            finally:
                state["recomputing"], norms.active = False, True

        return hook

    handles = [layer.register_forward_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        _calibration_forward(model, windows)
    finally:
        for handle in handles:
            handle.remove()
        norms.remove()
        bar.close()
    if state["done"] != len(layers):
        raise LayershapError(f"only {state['done']} of {len(layers)} decoder layers ran in the calibration pass")


def _report(records: list[list[dict]], budgets: np.ndarray, counts: list[int], method: str, pattern: str) -> dict:
    """Per layer and in all: weights, weights pruned, and zeros counted after pruning (``sparsity`` = zeros)."""
    layers = []
    for i, recs in enumerate(records):
        weights = sum(r["weights"] for r in recs)
        zeros = sum(r["zeros"] for r in recs)
        layers.append({"layer": i, "budget": float(budgets[i]), "weights": weights,
                       "pruned": sum(r["pruned"] for r in recs), "zeros": zeros, "sparsity": zeros / weights,
                       "modules": recs})
    total = sum(x["weights"] for x in layers)
    zeros = sum(x["zeros"] for x in layers)
    return {"method": method, "pattern": pattern, "weights": total, "pruned": sum(x["pruned"] for x in layers),
            "zeros": zeros, "sparsity": zeros / total,
            "mean_layer_sparsity": float(np.mean([x["sparsity"] for x in layers])), "counts": counts,
            "layers": layers}


def check_pattern_target(pattern: str, sparsity: float) -> None:
    """An ``N:M`` pattern fixes the mean sparsity at ``N / M`` (N pruned of every M); any other target is an error."""
    n_of_m = parse_pattern(pattern)
    if n_of_m is not None and abs(n_of_m[0] / n_of_m[1] - sparsity) > 1e-9:
        raise LayershapError(
            f"--pattern {pattern} prunes {n_of_m[0]} of every {n_of_m[1]} weights, a sparsity of "
            f"{n_of_m[0] / n_of_m[1]:g}, but --sparsity is {sparsity}; pass --sparsity {n_of_m[0] / n_of_m[1]:g}"
        )


def check_out_dir(out: str | Path) -> None:
    """Refuse a file, or a non-empty directory that is not an earlier sparsify output (nothing is overwritten)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LayershapError(f"--out {out} exists and is not a directory; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not (out / FILE_NAMES["json"]).exists():
        raise LayershapError(
            f"--out {out} is a non-empty directory that is not a layershap sparsified model; "
            "choose an empty or new directory so nothing there is overwritten"
        )


def check_request(sparsity: float, lam: float, allocation: str, method: str, pattern: str, out: str | Path) -> None:
    """Refuse, before any model loads, a target, lambda, allocation, method, pattern or output folder that cannot work."""
    check_budget(sparsity, lam, allocation)
    if method not in METHODS:
        raise LayershapError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    check_pattern_target(pattern, sparsity)
    check_out_dir(out)


@dataclass
class Sparsified:
    """What :func:`sparsify_model` did: the document written (``layershap_sparsity.json``), the counted
    report of :func:`sparsify_layers`, and seconds spent loading, calibrating and pruning, and saving."""

    document: dict
    report: dict
    seconds: dict[str, float]


def sparsify_model(
    model: str,
    out: str | Path,
    *,
    sparsity: float,
    allocation: str = "uniform",
    scores: ScoresRecord | None = None,
    scores_source: str | None = None,
    lam: float = 0.08,
    method: str = "wanda",
    pattern: str = "unstructured",
    text: str = "builtin",
    windows: int = SPARSIFY_WINDOWS,
    seq_len: int = SPARSIFY_SEQ_LEN,
    seed: int = 0,
    loading: LoadOptions = DEFAULT_LOADING,
    progress: bool = True,
) -> Sparsified:
    """Prune ``model``'s decoder-layer linear weights to per-layer budgets and save it with its budgets to ``out``.

    ``out`` receives a model ``from_pretrained`` reloads, ``layershap_sparsity.json``, ``sparsity_recipe.yaml``
    (llm-compressor) and ``sparsities.txt``. ``scores`` (with ``scores_source``, its file) are needed for
    ``allocation="scores"`` and must belong to this model. The calibration windows are the oracle's for the
    same ``text``, ``windows``, ``seq_len`` and ``seed``.

    Example:
        >>> done = sparsify_model("gemma-3-270m", "sparse/", sparsity=0.6, allocation="scores",  # doctest: +SKIP
        ...                       scores=read_scores("scores.json"), scores_source="scores.json")
        >>> done.report["zeros"], done.document["sparsities"][:3]  # doctest: +SKIP
    """
    from layershap.oracle.identity import check_same_model
    from layershap.oracle.loading import load_model
    from layershap.oracle.text import load_text, make_windows, windows_sha256

    started = time.perf_counter()
    check_request(sparsity, lam, allocation, method, pattern, out)
    if allocation == "scores" and scores is None:
        raise LayershapError("--allocation scores needs layer scores: pass --scores S.json (from `layershap shapley`)")
    out = Path(out)
    loaded = load_model(model, **loading.as_kwargs())
    loaded_at = time.perf_counter()
    calib = load_text(text)
    calib_windows = make_windows(loaded.tokenizer, calib.text, windows, seq_len, seed)
    n_layers = len(decoder_linears(loaded.model))
    values = None
    if allocation == "owl":
        values = owl_outlier_ratios(loaded.model, calib_windows)
    elif allocation == "scores":
        check_same_model(scores.identity, {"model_id": loaded.model_id, "model_hash": loaded.model_hash,
                                           "n_layers": n_layers},
                         what=scores_source or "the scores", fix="use the scores of this model, or --allocation owl")
        values = scores.scores.values
    budgets = layer_budgets(allocation, n_layers, sparsity, lam, values)
    report = sparsify_layers(loaded.model, calib_windows, budgets, method, pattern, progress)
    pruned_at = time.perf_counter()

    out.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    document = {
        "format": "layershap-sparsity", "format_version": 1,
        "model_id": loaded.model_id, "model_hash": loaded.model_hash, "n_layers": n_layers,
        "layers": list(range(n_layers)), "sparsities": [float(b) for b in budgets], "target": sparsity,
        "lambda": lam if allocation != "uniform" else 0.0, "mean": float(np.mean(budgets)),
        "allocation": allocation,
        "values": None if values is None else [float(v) for v in values],
        "values_kind": {"owl": f"OWL outlier ratio (m = {OWL_M:g})",
                        "scores": f"layer scores ({scores.scores.index if scores else None})"}.get(allocation),
        "source_scores": scores_source if allocation == "scores" else None,
        "method": method, "pattern": pattern, "achieved_sparsities": [layer["sparsity"] for layer in report["layers"]],
        "pruned_weights": report["pruned"], "zero_weights": report["zeros"], "prunable_weights": report["weights"],
        "calibration": {"text_id": calib.text_id, "windows": windows, "seq_len": seq_len, "seed": seed,
                        "windows_sha256": windows_sha256(calib_windows)},
    }
    model_type = getattr(loaded.model.config, "model_type", "")
    write_formats(out, document, layer_prefix=LAYER_PATHS.get(model_type, "model.layers"), modifier="wanda",
                  pattern=pattern, sequential_target=type(find_layers(loaded.model).layers[0]).__name__)
    seconds = {"load": loaded_at - started, "prune": pruned_at - loaded_at, "save": time.perf_counter() - pruned_at}
    return Sparsified(document, report, seconds)
