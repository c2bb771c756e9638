"""layershap vs the peer depth-pruning methods under one protocol.

Every method chooses which K layers to remove from the **calibration** windows (through the same oracle:
one :class:`MaskedEvaluator` on them, plus one hidden-states pass for the similarity methods); every choice
is then scored by the held-out perplexity of the pruned model on the **evaluation** text (consecutive
windows, BOS per window; evaluated in memory with the layers skipped) and, with ``tasks``, by its zero-shot
accuracy through lm-evaluation-harness (acc and acc_norm, also as % of the dense model's: "% retained").
Each method reports the oracle passes it spent (one pass = the model, masked or not, over all calibration
windows).

layershap itself appears twice: the K layers with the lowest scores (semivalue / Shapley on the surrogate),
and the surrogate-guided subset search (exhaustive or beam, top candidates re-measured by the oracle). Its
passes are the rows of the dataset the surrogate was trained on, plus the re-measured candidates. Without a
surrogate one is built on the calibration windows from a small stratified set of masks.

Identical masks are measured once (a cache shared by all methods); each method is still charged every pass
it asked for.

Example:
    >>> doc = run_compare(CompareConfig(model="gemma-3-270m", calib_text="builtin", eval_text="heldout.txt",  # doctest: +SKIP
    ...                                 ks=[1, 2, 3, 4], out=Path("runs/compare")))
    >>> print(format_table(doc))                      # module compare_report  # doctest: +SKIP
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from layershap.core.errors import LayershapError
from layershap.core.jsonio import jsonable, write_json
from layershap.core.load_options import DEFAULT_LOADING, LoadOptions
from layershap.core.masks import check_removal_count
from layershap.oracle.evaluate import MaskedEvaluator
from layershap.oracle.identity import check_same_model
from layershap.oracle.loading import LoadedModel, load_model
from layershap.oracle.measure import CachedOracle, dataset_identity, measure_masks
from layershap.oracle.positions import fit_seq_len
from layershap.oracle.store import DatasetStore
from layershap.oracle.text import CalibrationText, eval_windows, load_text, make_windows, windows_sha256
from layershap.oracle.zeroshot import ZeroShot
from layershap.sampling.stratified import stratified_masks
from layershap.shapley.estimate import compute_scores
from layershap.shapley.scores_io import write_scores
from layershap.shapley.semivalues import choose_index, coverage_report
from layershap.surrogate.checkpoint import Surrogate, load_surrogate
from layershap.surrogate.metrics import not_validated
from layershap.surrogate.train import train_surrogate

from .baselines import Removal, lowest, run_baselines
from .compare_report import plot_compare
from .compare_tasks import task_accuracy
from .search import search_and_verify

# Defaults by device kind: calibration windows/tokens, evaluation windows/tokens, windows per forward pass,
# and the number of stratified masks of the surrogate built when none is given.
DEFAULTS: dict[str, dict[str, int]] = {
    "cpu": {"windows": 4, "seq_len": 128, "eval_windows": 8, "eval_seq_len": 128, "batch_size": 4, "n_masks": 64},
    "cuda": {"windows": 16, "seq_len": 512, "eval_windows": 32, "eval_seq_len": 1024, "batch_size": 8,
             "n_masks": 256},
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
    n_masks: int | None = None
    members: int = 8
    top: int = 3
    beam_width: int = 64
    index: str = "auto"
    loading: LoadOptions = DEFAULT_LOADING
    batch_size: int | None = None
    progress: bool = True
    tasks: list[str] | None = None
    task_dir: str | None = None
    limit: int | None = None


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


def _sizes(cfg: CompareConfig, kind: str, loaded: LoadedModel) -> dict[str, int | None]:
    """Window counts and lengths: the config's, else the device defaults shortened to the model's position
    limit (a length the user gave is checked by the evaluator instead)."""
    d = DEFAULTS[kind]

    def fit(value: int) -> int:
        return fit_seq_len(loaded.model, loaded.tokenizer, value)

    return {
        "windows": cfg.windows or d["windows"],
        "seq_len": cfg.seq_len or fit(d["seq_len"]),
        "eval_windows": None if cfg.eval_all_windows else (cfg.eval_windows or d["eval_windows"]),
        "eval_seq_len": cfg.eval_seq_len or fit(d["eval_seq_len"]),
        "batch_size": cfg.batch_size or d["batch_size"],
        "n_masks": cfg.n_masks or d["n_masks"],
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
    if not ks:
        raise LayershapError("--remove lists no K; give the numbers of layers to remove, e.g. --remove 1,2,3")
    return [check_removal_count(k, n) for k in ks]


def build_surrogate(loaded: LoadedModel, calib_text_id: str, windows: np.ndarray, seq_len: int,
                    evaluator: MaskedEvaluator, out: Path, n_masks: int, members: int, seed: int,
                    progress: bool) -> tuple[Surrogate, DatasetStore]:
    """Measure ``n_masks`` stratified masks into ``out/dataset.zarr`` and train ``out/surrogate`` on them.

    Reuses the store when it exists for the same model and windows (a killed run resumes). Returns
    ``(surrogate, store)``.
    """
    n = evaluator.n_layers
    if n_masks < n + 2:
        raise LayershapError(f"--n-masks {n_masks} is too small: it must cover the full model and the {n} "
                             f"leave-one-out masks plus some larger removals; use at least {n + 2}")
    with DatasetStore.create_or_open(out / "dataset.zarr",
                                     dataset_identity(loaded, calib_text_id, windows, seq_len), windows) as store:
        measure_masks(evaluator, store, stratified_masks(n, n_masks, seed=seed), progress=progress)
    surrogate = train_surrogate(store, out / "surrogate", members=members, seed=seed, progress=progress)
    return surrogate, store


def _surrogate_scores(surrogate: Surrogate, n: int, index: str, progress: bool):
    removed, excluded = surrogate.metadata.get("removed_counts"), not_validated(surrogate.metadata)
    chosen = choose_index(index, None, removed, n, excluded)
    coverage = coverage_report(chosen, removed, n, excluded)
    scores = compute_scores(surrogate, n, chosen, method="auto", progress=progress)
    return scores, chosen, coverage


def prepare_layershap(cfg: CompareConfig, loaded: LoadedModel, calib: CalibrationText, windows: np.ndarray,
                      seq_len: int, evaluator: MaskedEvaluator, oracle: CachedOracle,
                      n_masks: int) -> LayershapSurrogate:
    """Load ``cfg.surrogate`` (checked against the model) or build one; compute its layer scores."""
    n = evaluator.n_layers
    if cfg.surrogate is not None:
        surrogate = load_surrogate(cfg.surrogate)
        meta = surrogate.metadata
        check_same_model(meta, {"model_id": loaded.model_id, "model_hash": loaded.model_hash, "n_layers": n},
                         what=f"the surrogate {cfg.surrogate}", fix="give this model's surrogate, or none to build one")
        rows = int((meta.get("split") or {}).get("rows") or 0)
        if not rows:
            raise LayershapError(f"the surrogate metadata in {cfg.surrogate} do not say how many measured masks "
                                 "it was trained on (split.rows), so its oracle passes are unknown; retrain it")
        path, built = str(cfg.surrogate), False
    else:
        surrogate, store = build_surrogate(loaded, calib.text_id, windows, seq_len, evaluator, cfg.out, n_masks,
                                           cfg.members, cfg.seed, cfg.progress)
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


def run_compare(cfg: CompareConfig) -> dict:
    """Run the whole comparison; writes ``compare.json`` and ``compare.png`` into ``cfg.out``; returns the doc.

    Example:
        >>> doc = run_compare(CompareConfig("gemma-3-270m", "builtin", "heldout.txt", [1, 2], Path("out")))  # doctest: +SKIP
    """
    started = time.perf_counter()
    if cfg.seeds < 1:
        raise LayershapError(f"--seeds must be at least 1, got {cfg.seeds}")
    calib = load_text(cfg.calib_text)
    evaluation = load_text(cfg.eval_text)
    check_texts_differ(calib, evaluation)
    # tasks before the model: a missing task fails fast
    zeroshot = ZeroShot(cfg.tasks, cfg.task_dir, cfg.limit, cfg.batch_size) if cfg.tasks else None
    loaded = load_model(cfg.model, **cfg.loading.as_kwargs())
    kind = "cuda" if loaded.device.type == "cuda" else "cpu"
    sz = _sizes(cfg, kind, loaded)
    model, tok = loaded.model, loaded.tokenizer
    windows = make_windows(tok, calib.text, sz["windows"], sz["seq_len"], seed=cfg.seed)
    ev_windows = eval_windows(tok, evaluation.text, sz["eval_seq_len"], sz["eval_windows"])
    calib_ev = MaskedEvaluator(model, windows, batch_size=sz["batch_size"], device=loaded.device)
    eval_ev = MaskedEvaluator(model, ev_windows, batch_size=sz["batch_size"], device=loaded.device)
    n = calib_ev.n_layers
    ks = _check_ks(cfg.ks, n)
    cfg.out.mkdir(parents=True, exist_ok=True)
    oracle = CachedOracle(calib_ev, label="calibration oracle", progress=cfg.progress)

    _log(f"{loaded.model_id}: {n} layers; calibration {calib.text_id} {windows.shape[0]} x {sz['seq_len']}, "
         f"evaluation {evaluation.text_id} {ev_windows.shape[0]} x {sz['eval_seq_len']}")
    ls = prepare_layershap(cfg, loaded, calib, windows, sz["seq_len"], calib_ev, oracle, sz["n_masks"])
    _log("baselines ...")
    removals = run_baselines(model, oracle, windows, ks, seeds=tuple(range(cfg.seeds)),
                             batch_size=sz["batch_size"], progress=cfg.progress)
    removals += layershap_removals(ls, oracle, n, ks, cfg)

    # held-out evaluation of every distinct pruned model (in memory: layers skipped, nothing saved)
    full_mask = np.ones((1, n), bool)
    eval_cache = CachedOracle(eval_ev, label="held-out evaluation", progress=cfg.progress)
    all_masks = np.vstack([full_mask] + [r.mask(n)[None, :] for r in removals])
    _log(f"held-out evaluation of {len({m.tobytes() for m in all_masks})} distinct models ...")
    eval_nll = eval_cache.loss(all_masks)
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
    }
    if zeroshot is not None:
        task_accuracy(doc, zeroshot, loaded, all_masks, cfg.progress)
    doc["seconds"] = time.perf_counter() - started
    doc = jsonable(doc)
    write_json(cfg.out / "compare.json", doc)
    plot_compare(doc, cfg.out / "compare.png")
    return doc


def _log(message: str) -> None:
    print(f"layershap compare: {message}", file=sys.stderr, flush=True)
