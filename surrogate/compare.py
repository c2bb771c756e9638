"""layershap vs the peer depth-pruning methods under one protocol.

Every method chooses which K layers to remove from the **calibration** windows (through the same oracle:
one :class:`MaskedEvaluator` on them, plus one hidden-states pass for the similarity methods); every choice
is then scored by the held-out perplexity of the pruned model on the **evaluation** text (consecutive
windows, BOS per window; evaluated in memory with the layers skipped). Each method reports the oracle
passes it spent (one pass = the model, masked or not, over all calibration windows).

layershap itself appears twice: the K layers with the lowest scores (semivalue / Shapley on the surrogate),
and the surrogate-guided subset search (exhaustive or beam, top candidates re-measured by the oracle). Its
passes are the rows of the dataset the surrogate was trained on, plus the re-measured candidates. Without a
surrogate one is built on the calibration windows with a small stratified budget.

Identical masks are measured once (a cache shared by all methods); each method is still charged every pass
it asked for.

Example:
    >>> doc = run_compare(CompareConfig(model="gemma-3-270m", calib_text="builtin", eval_text="heldout.txt",
    ...                                 ks=[1, 2, 3, 4], out=Path("runs/compare")))
    >>> print(format_table(doc))
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from layershap.oracle.errors import LayershapError, StoreMismatchError
from layershap.oracle.measure import measure_in_groups

from .baselines import Removal

# Defaults by device kind: calibration windows/tokens, evaluation windows/tokens, windows per forward pass,
# and the stratified mask budget of the surrogate built when none is given.
DEFAULTS: dict[str, dict[str, int]] = {
    "cpu": {"windows": 4, "seq_len": 128, "eval_windows": 8, "eval_seq_len": 128, "batch_size": 4, "budget": 64},
    "cuda": {"windows": 16, "seq_len": 512, "eval_windows": 32, "eval_seq_len": 1024, "batch_size": 8,
             "budget": 256},
}

LAYERSHAP_LOWEST = "layershap: lowest scores"
LAYERSHAP_SEARCH = "layershap: subset search"


@dataclass
class CompareConfig:
    """Settings of one comparison; ``None`` sizes take the device defaults (:data:`DEFAULTS`)."""

    model: str
    calib_text: str
    eval_text: str
    ks: list[int]
    out: Path
    windows: int | None = None
    seq_len: int | None = None
    eval_windows: int | None = None
    eval_seq_len: int | None = None
    eval_all_windows: bool = False
    surrogate: str | None = None
    seeds: int = 3
    seed: int = 0
    budget: int | None = None
    top: int = 3
    beam_width: int = 64
    index: str = "auto"
    device: str = "auto"
    batch_size: int | None = None
    progress: bool = True


class CachedOracle:
    """Value function ``-nll`` over a :class:`MaskedEvaluator`; each distinct mask is measured once.

    Example:
        >>> oracle = CachedOracle(MaskedEvaluator(model, windows)); oracle(masks); oracle.measured
    """

    def __init__(self, evaluator, label: str = "oracle", progress: bool = True) -> None:
        self.evaluator = evaluator
        self.n_layers = evaluator.n_layers
        self.label = label
        self.progress = progress
        self.cache: dict[bytes, float] = {}
        self.measured = 0  # masks actually run through the model

    def seed(self, masks: np.ndarray, nll: np.ndarray) -> None:
        """Add already measured rows (same model, same windows)."""
        for m, v in zip(np.asarray(masks, bool), np.asarray(nll, float)):
            self.cache[m.tobytes()] = float(v)

    def known(self, mask: np.ndarray) -> float | None:
        return self.cache.get(np.asarray(mask, bool).tobytes())

    def nll(self, masks: np.ndarray) -> np.ndarray:
        masks = np.asarray(masks, dtype=bool).reshape(-1, self.n_layers)
        todo = np.array([m for m in masks if m.tobytes() not in self.cache]).reshape(-1, self.n_layers)
        self.measured += measure_in_groups(self.evaluator, todo, lambda group, nll, _: self.seed(group, nll),
                                           progress=self.progress, desc=self.label)
        return np.array([self.cache[m.tobytes()] for m in masks])

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        return -self.nll(masks)


@dataclass
class LayershapSurrogate:
    """The surrogate used for the layershap rows, with where it came from and what its data cost."""

    surrogate: Any
    path: str
    built: bool
    rows: int
    scores: Any
    index: str
    extra: dict = field(default_factory=dict)


def _sizes(cfg: CompareConfig, kind: str) -> dict[str, int | None]:
    d = DEFAULTS[kind]
    return {
        "windows": cfg.windows or d["windows"],
        "seq_len": cfg.seq_len or d["seq_len"],
        "eval_windows": None if cfg.eval_all_windows else (cfg.eval_windows or d["eval_windows"]),
        "eval_seq_len": cfg.eval_seq_len or d["eval_seq_len"],
        "batch_size": cfg.batch_size or d["batch_size"],
        "budget": cfg.budget or d["budget"],
    }


def check_texts_differ(calib, evaluation) -> None:
    """Calibration and evaluation text must differ (held-out evaluation)."""
    if calib.text == evaluation.text or calib.text_id == evaluation.text_id:
        raise LayershapError(
            f"the calibration text and the evaluation text are the same ({calib.text_id}); the evaluation must be "
            "on held-out text: pass a different --eval-text (e.g. wikitext2 or a local .txt file)"
        )


def _check_ks(ks: list[int], n: int) -> list[int]:
    ks = sorted({int(k) for k in ks})
    bad = [k for k in ks if not 1 <= k < n]
    if not ks or bad:
        raise LayershapError(f"--remove {ks}: each K must be in 1..{n - 1} for this {n}-layer model")
    return ks


def build_surrogate(loaded, calib_text_id: str, windows: np.ndarray, seq_len: int, evaluator, out: Path,
                    budget: int, seed: int, progress: bool):
    """Measure ``budget`` stratified masks into ``out/dataset.zarr`` and train ``out/surrogate`` on them.

    Reuses the store when it exists for the same model and windows (a killed run resumes). Returns
    ``(surrogate, store)``.
    """
    from layershap.oracle.measure import dataset_identity, measure_masks
    from layershap.oracle.store import DatasetStore
    from layershap.sampling.stratified import stratified_masks

    from .checkpoint import load_surrogate
    from .train import train_surrogate

    n = evaluator.n_layers
    if budget < n + 2:
        raise LayershapError(f"--budget {budget} is too small: it must cover the full model and the {n} "
                             f"leave-one-out masks plus some larger removals; use at least {n + 2}")
    store_path = out / "dataset.zarr"
    store = DatasetStore.create_or_open(store_path, dataset_identity(loaded, calib_text_id, windows, seq_len),
                                        windows)
    masks = stratified_masks(n, budget, seed=seed)
    measure_masks(evaluator, store, masks, progress=progress)
    sur_dir = out / "surrogate"
    train_surrogate(store_path, sur_dir, members=1, seed=seed, progress=progress)
    return load_surrogate(sur_dir), store


def _surrogate_scores(surrogate, n: int, index: str, progress: bool):
    from .cli_shapley import choose_index, coverage_report
    from .shapley import compute_scores

    chosen = choose_index(index, None, surrogate.metadata.get("removed_counts"), n)
    coverage = coverage_report(chosen, surrogate.metadata.get("removed_counts"), n)
    scores = compute_scores(surrogate, n, chosen, method="auto", progress=progress)
    return scores, chosen, coverage


def prepare_layershap(cfg: CompareConfig, loaded, calib, windows: np.ndarray, seq_len: int, evaluator,
                      oracle: CachedOracle, budget: int) -> LayershapSurrogate:
    """Load ``cfg.surrogate`` (checked against the model) or build one; compute its layer scores."""
    from .checkpoint import load_surrogate
    from .scores_io import write_scores

    n = evaluator.n_layers
    if cfg.surrogate is not None:
        surrogate = load_surrogate(cfg.surrogate)
        meta = surrogate.metadata
        if surrogate.n_layers != n:
            raise StoreMismatchError(f"the surrogate {cfg.surrogate} is for a {surrogate.n_layers}-layer model; "
                                     f"{loaded.model_id} has {n} layers. Give this model's surrogate, or none")
        if meta.get("model_hash") and meta["model_hash"] != loaded.model_hash:
            raise StoreMismatchError(
                f"the surrogate {cfg.surrogate} was trained for model {meta.get('model_id')!r} "
                f"(hash {str(meta['model_hash'])[:12]}...), not {loaded.model_id!r} (hash {loaded.model_hash[:12]}...);"
                " give this model's surrogate, or none to build one"
            )
        rows = int((meta.get("split") or {}).get("rows") or 0)
        if not rows:
            raise LayershapError(f"the surrogate metadata in {cfg.surrogate} do not say how many measured masks "
                                 "it was trained on (split.rows), so its oracle passes are unknown; retrain it")
        path, built = str(cfg.surrogate), False
    else:
        surrogate, store = build_surrogate(loaded, calib.text_id, windows, seq_len, evaluator, cfg.out, budget,
                                           cfg.seed, cfg.progress)
        oracle.seed(store.masks, store.nll)  # the same windows and model: these rows are oracle answers
        rows, path, built = len(store), str(cfg.out / "surrogate"), True
    scores, chosen, coverage = _surrogate_scores(surrogate, n, cfg.index, cfg.progress)
    write_scores(cfg.out / "scores.json", scores, surrogate.metadata, source=path,
                 index_description=chosen.describe(n), coverage=coverage)
    return LayershapSurrogate(surrogate, path, built, rows, scores, chosen.name,
                              {"metrics": (surrogate.metadata.get("metrics") or {}).get("overall")})


def layershap_removals(ls: LayershapSurrogate, oracle: CachedOracle, n: int, ks: list[int],
                       cfg: CompareConfig) -> list[Removal]:
    """The two layershap methods at every K: lowest scores, and surrogate subset search verified by the oracle."""
    from .baselines import lowest
    from .subset_search import search_and_verify

    out = []
    for k in ks:
        out.append(Removal(LAYERSHAP_LOWEST, k, lowest(ls.scores.values, k), ls.rows,
                           extra={"index": ls.index, "scores": ls.scores.values.tolist()}))
    for k in ks:
        res = search_and_verify(ls.surrogate, oracle, n, k, top=cfg.top, beam_width=cfg.beam_width,
                                progress=cfg.progress)
        out.append(Removal(
            LAYERSHAP_SEARCH, k, tuple(sorted(res.winner.removed)), ls.rows + res.oracle_passes,
            extra={"strategy": res.strategy, "surrogate_calls": res.value_calls,
                   "predicted_calib_nll": -res.winner.predicted, "calib_nll": -res.winner.measured,
                   "candidates": [{"removed": list(c.removed), "predicted_calib_nll": -c.predicted,
                                   "calib_nll": -c.measured} for c in res.candidates]},
        ))
    return out


def _pass_text(passes: list[int]) -> str:
    return str(passes[0]) if len(set(passes)) == 1 else "/".join(str(p) for p in passes)


def method_order(results: list[dict]) -> list[str]:
    seen: list[str] = []
    for r in results:
        if r["method"] not in seen:
            seen.append(r["method"])
    return seen


def summarize(doc: dict) -> list[dict]:
    """One row per method: mean perplexity per K (random: mean over seeds, with min/max), passes per K."""
    rows = []
    for method in method_order(doc["results"]):
        rs = [r for r in doc["results"] if r["method"] == method]
        per_k = {}
        for k in doc["ks"]:
            at = [r for r in rs if r["k"] == k]
            ppl = [r["eval_ppl"] for r in at]
            per_k[k] = {"ppl": float(np.exp(np.mean([r["eval_nll"] for r in at]))) if len(at) > 1 else ppl[0],
                        "min": min(ppl), "max": max(ppl), "passes": max(r["oracle_passes"] for r in at),
                        "n": len(at)}
        rows.append({"method": method, "per_k": per_k})
    return rows


def format_table(doc: dict) -> str:
    """The comparison as a text table: held-out perplexity per method x K, and oracle passes per K."""
    ks = doc["ks"]
    rows = summarize(doc)
    labels = [r["method"] + (f" ({r['per_k'][ks[0]]['n']} seeds, geo-mean)" if r["per_k"][ks[0]]["n"] > 1 else "")
              for r in rows]
    name_w = max(len("method"), *(len(label) for label in labels)) + 2
    head = f"{'method':<{name_w}}" + "".join(f"{'K=' + str(k):>12}" for k in ks) + "   oracle passes (per K)"
    lines = [
        f"held-out perplexity after removing K of {doc['n_layers']} layers -- {doc['model_id']}",
        (f"calibration: {doc['calib']['text_id']} ({doc['calib']['n_windows']} x {doc['calib']['seq_len']} "
         f"tokens); evaluation: {doc['eval']['text_id']} ({doc['eval']['n_windows']} x {doc['eval']['seq_len']} "
         f"tokens); full model perplexity {doc['full']['eval_ppl']:.3f}"),
        head,
        "-" * len(head),
    ]
    for r, label in zip(rows, labels):
        cells = "".join(f"{_fmt_ppl(r['per_k'][k]['ppl']):>12}" for k in ks)
        lines.append(f"{label:<{name_w}}" + cells + "   " + _pass_text([r["per_k"][k]["passes"] for k in ks]))
    if doc.get("layershap"):
        ls = doc["layershap"]
        lines.append(f"layershap: {ls['index']} scores from {'a surrogate built here' if ls['built'] else ls['path']} "
                     f"on {ls['rows']} measured masks; subset search re-measures the top {doc['config']['top']}")
    lines.append(f"oracle: {doc['oracle_measured']} distinct calibration masks measured in total (shared between "
                 f"methods), {doc['eval_measured']} distinct pruned models evaluated on held-out text; "
                 f"{doc['seconds']:.0f} s")
    return "\n".join(lines)


def _fmt_ppl(x: float) -> str:
    return f"{x:.3f}" if x < 1e4 else f"{x:.3g}"


def plot_compare(doc: dict, path: Path) -> Path:
    """PNG line plot: held-out perplexity (log scale) vs layers removed, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [0] + list(doc["ks"])
    full = doc["full"]["eval_ppl"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    markers = "osD^vP<>X*"
    for i, r in enumerate(summarize(doc)):
        y = [full] + [r["per_k"][k]["ppl"] for k in doc["ks"]]
        ours = r["method"].startswith("layershap")
        line, = ax.plot(ks, y, "-" if ours else "--", marker=markers[i % len(markers)], label=r["method"],
                        lw=2.2 if ours else 1.2, ms=7 if ours else 5, alpha=0.9, zorder=3 if ours else 2)
        if r["per_k"][doc["ks"][0]]["n"] > 1:
            lo = [full] + [r["per_k"][k]["min"] for k in doc["ks"]]
            hi = [full] + [r["per_k"][k]["max"] for k in doc["ks"]]
            ax.fill_between(ks, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_yscale("log")
    ax.set_xticks(ks)
    ax.set_xlabel("decoder layers removed")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title(f"{doc['model_id']}: {doc['n_layers']} layers, eval {doc['eval']['text_id']}"[:90], fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _jsonable(obj: Any) -> Any:
    from .scores_io import jsonable

    return jsonable(obj)


def run_compare(cfg: CompareConfig) -> dict:
    """Run the whole comparison; writes ``compare.json`` and ``compare.png`` into ``cfg.out``; returns the doc.

    Example:
        >>> doc = run_compare(CompareConfig("gemma-3-270m", "builtin", "heldout.txt", [1, 2], Path("out")))
    """
    from layershap.oracle.evaluate import MaskedEvaluator
    from layershap.oracle.loading import load_model
    from layershap.oracle.text import eval_windows, load_text, make_windows, windows_sha256

    from .baselines import run_baselines

    started = time.perf_counter()
    if cfg.seeds < 1:
        raise LayershapError(f"--seeds must be >= 1, got {cfg.seeds}")
    calib = load_text(cfg.calib_text)
    evaluation = load_text(cfg.eval_text)
    check_texts_differ(calib, evaluation)
    loaded = load_model(cfg.model, device=cfg.device)
    kind = "cuda" if loaded.device.type == "cuda" else "cpu"
    sz = _sizes(cfg, kind)
    model, tok = loaded.model, loaded.tokenizer
    windows = make_windows(tok, calib.text, sz["windows"], sz["seq_len"], seed=cfg.seed)
    ev_windows = eval_windows(tok, evaluation.text, sz["eval_seq_len"], sz["eval_windows"])
    calib_ev = MaskedEvaluator(model, windows, batch_size=sz["batch_size"])
    eval_ev = MaskedEvaluator(model, ev_windows, batch_size=sz["batch_size"])
    n = calib_ev.n_layers
    ks = _check_ks(cfg.ks, n)
    cfg.out.mkdir(parents=True, exist_ok=True)
    oracle = CachedOracle(calib_ev, "calibration oracle", cfg.progress)

    _log(f"{loaded.model_id}: {n} layers; calibration {calib.text_id} {windows.shape[0]} x {sz['seq_len']}, "
         f"evaluation {evaluation.text_id} {ev_windows.shape[0]} x {sz['eval_seq_len']}")
    ls = prepare_layershap(cfg, loaded, calib, windows, sz["seq_len"], calib_ev, oracle, sz["budget"])
    _log("baselines ...")
    removals = run_baselines(model, oracle, windows, ks, seeds=tuple(range(cfg.seeds)),
                             batch_size=sz["batch_size"], progress=cfg.progress)
    removals += layershap_removals(ls, oracle, n, ks, cfg)

    # held-out evaluation of every distinct pruned model (in memory: layers skipped, nothing saved)
    full_mask = np.ones((1, n), bool)
    eval_cache = CachedOracle(eval_ev, "held-out evaluation", cfg.progress)
    all_masks = np.vstack([full_mask] + [r.mask(n)[None, :] for r in removals])
    _log(f"held-out evaluation of {len({m.tobytes() for m in all_masks})} distinct models ...")
    eval_nll = eval_cache.nll(all_masks)
    results = []
    for r, nll in zip(removals, eval_nll[1:]):
        results.append({
            "method": r.method, "k": r.k, "seed": r.seed, "removed": list(r.removed),
            "oracle_passes": r.oracle_passes, "eval_nll": float(nll), "eval_ppl": float(math.exp(nll)),
            "calib_nll": oracle.known(r.mask(n)), "extra": r.extra,
        })
    doc = {
        "model_id": loaded.model_id, "model_hash": loaded.model_hash, "n_layers": n, "ks": ks,
        "device": str(loaded.device),
        "calib": {"text_id": calib.text_id, "n_windows": int(windows.shape[0]), "seq_len": sz["seq_len"],
                  "windows_sha256": windows_sha256(windows), "seed": cfg.seed},
        "eval": {"text_id": evaluation.text_id, "n_windows": int(ev_windows.shape[0]), "seq_len": sz["eval_seq_len"],
                 "windows_sha256": windows_sha256(ev_windows), "n_tokens": int(eval_ev.n_tokens)},
        "full": {"eval_nll": float(eval_nll[0]), "eval_ppl": float(math.exp(eval_nll[0])),
                 "calib_nll": oracle.known(full_mask[0])},
        "layershap": {"path": ls.path, "built": ls.built, "rows": ls.rows, "index": ls.index,
                      "scores": ls.scores.values.tolist(), "ranking": ls.scores.ranking().tolist(), **ls.extra},
        "results": results,
        "oracle_measured": oracle.measured + (ls.rows if ls.built else 0),
        "eval_measured": eval_cache.measured,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()} | sz,
        "seconds": time.perf_counter() - started,
    }
    doc = _jsonable(doc)
    (cfg.out / "compare.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot_compare(doc, cfg.out / "compare.png")
    return doc


def _log(message: str) -> None:
    print(f"layershap compare: {message}", file=sys.stderr, flush=True)
