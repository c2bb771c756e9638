"""The main job as library calls: oracle on stratified masks -> verified depth-pruning plans (search with the oracle
in the loop on the calibration windows, decided on blocks of fresh windows) -> surrogate ensemble on every row
(the stratified and the search's rows) -> layer scores (the index the data support) -> summary: a table of layer,
score ± s.e., rank and leave-one-out perplexity, and the plans for K = 1 .. 30 % of the layers with how sure each
is. The whole job's token budget (sized by depth, K range and device, or given) is printed before anything is
measured. Everything goes into one folder; running the same job again resumes and never measures a mask twice.
The trained surrogate is added to the registry (``layershap registry``).

Example:
    >>> summary = run_main_job(model="gemma-3-270m", out=Path("runs/gemma-3-270m"))  # doctest: +SKIP
    >>> summary["suggestions"][0]["layers"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from layershap.core.defaults import CALIBRATION_SEQ_LEN, CALIBRATION_WINDOWS, main_job_masks
from layershap.core.errors import LayershapError
from layershap.core.jsonio import write_json, write_text_atomic
from layershap.core.load_options import DEFAULT_LOADING, LoadOptions
from layershap.oracle.measure import measure_masks
from layershap.oracle.session import open_session
from layershap.oracle.store import DatasetStore
from layershap.sampling.specs import parse_mask_spec
from layershap.shapley.scores_io import ScoresRecord
from layershap.surrogate.metrics import training_report
from layershap.surrogate.network import DEFAULT_HIDDEN
from layershap.surrogate.train import train_surrogate

from .active import run_active_sampling
from .plans import DEPTH_REDUCTIONS, default_ks, format_plans, run_plans, session_budget
from .scores import score_surrogate


def default_out(model: str) -> Path:
    """``runs/<model name>``: the main job's folder when none is given.

    Example:
        >>> default_out("./models/my-llama.gguf")
        PosixPath('runs/my-llama')
    """
    return Path("runs") / Path(model).name.replace(".gguf", "")


def _heading(text: str) -> None:
    print(f"\n== {text} ==", flush=True)


def run_main_job(
    *,
    model: str = "gemma-3-270m",
    text: str = "builtin",
    out: Path | None = None,
    n_masks: int | None = None,
    sampling: str = "stratified",
    active_rows: int | None = None,
    windows: int = CALIBRATION_WINDOWS,
    seq_len: int = CALIBRATION_SEQ_LEN,
    seed: int = 0,
    loading: LoadOptions = DEFAULT_LOADING,
    batch_size: int = 4,
    cache_mb: int | None = None,
    members: int = 8,
    hidden: int = DEFAULT_HIDDEN,
    tokens: int | None = None,
    remove: list[int] | None = None,
    utility: str = "nll",
    players: str = "blocks",
    heal: str | None = None,
    register: bool = True,
    progress: bool = True,
) -> dict:
    """Run the main job into ``out`` (default :func:`default_out`); returns the summary (also summary.json).

    Writes ``dataset.zarr``, ``decision-<b>.zarr``, ``plans.json``, ``surrogate/``, ``scores.json`` (+ PNGs),
    ``summary.json`` and, with ``active_rows`` (active sampling: total stratified + active rows),
    ``active_sampling.json``. ``n_masks``: stratified masks (default :func:`~layershap.core.defaults.main_job_masks`
    of the depth); ``tokens``: the whole job's oracle tokens (default: what the depth, K range and device need;
    a smaller total shrinks the plan search in proportion, a total below what the K range needs is refused before
    anything is measured); ``remove``: the K values to plan (default 1 .. 30 % of the layers); ``utility``: ``nll``
    or ``kl``; ``players``: ``blocks`` (decoder layers) or ``sublayers`` (each layer's attention and MLP apart:
    2n players, K counts sublayers); ``heal``: also plan for the model healed with this training-free method
    (``bias``, ``linear``, ``lowrank:R``; into ``heal-<method>/``); ``register``: add the surrogate to the registry.

    Example:
        >>> run_main_job(model="./tiny", out=Path("runs/tiny"), n_masks=24, windows=2, seq_len=16)  # doctest: +SKIP
    """
    started = time.perf_counter()
    out = Path(out) if out is not None else default_out(model)
    out.mkdir(parents=True, exist_ok=True)
    store_path, surrogate_dir, scores_path = out / "dataset.zarr", out / "surrogate", out / "scores.json"

    _heading("1/5 oracle: measure log-perplexity of layer masks")
    session = open_session(model=model, text=text, masks="loo", out=store_path, windows=windows, seq_len=seq_len,
                           seed=seed, loading=loading, batch_size=batch_size, cache_mb=cache_mb, utility=utility,
                           players=players)
    store, evaluator = session.store, session.evaluator
    n = store.n_layers
    count = main_job_masks(n) if n_masks is None else n_masks
    stratified = parse_mask_spec(sampling, n, count, seed)
    ks = remove or default_ks(n)
    stratified_tokens = len(stratified) * evaluator.n_tokens
    if tokens is not None and tokens <= stratified_tokens:
        raise LayershapError(f"--tokens {tokens:,} leaves nothing for the plans: the {len(stratified)} stratified "
                             f"masks alone take {stratified_tokens:,} tokens; give more tokens or fewer --n-masks")
    budget = session_budget(session, ks, None if tokens is None else tokens - stratified_tokens)
    print(f"job budget: at most {stratified_tokens + budget.tokens():,} oracle tokens — {len(stratified)} stratified "
          f"masks ({stratified_tokens:,} tokens), then the plans: {budget.describe()}")
    measure_masks(evaluator, store, stratified, progress=progress)
    if active_rows is not None:
        report = run_active_sampling(evaluator, store, budget=active_rows, seed=seed, members=members,
                                     hidden=hidden, progress=progress)
        write_text_atomic(out / "active_sampling.json", json.dumps(report, indent=2, default=str))
    print(f"{len(store)} masks measured in {store_path}")

    _heading("2/5 plans: search removal sets with the oracle in the loop, decide on fresh windows")
    plans = run_plans(session, text=text, out=out, ks=ks, budget=budget, seed=seed, batch_size=batch_size,
                      cache_mb=cache_mb, progress=progress)
    print(f"{plans['passes']} new screening passes, {plans['decision_passes']} decision passes; {len(store)} rows in "
          f"{store_path}")
    healed = None
    if heal is not None:
        from .heal_plans import format_healed, run_healed_plans

        _heading(f"2b/5 plans for the model healed with {heal}")
        healed = run_healed_plans(session, text=text, method=heal, out=out, ks=ks, budget=budget, seed=seed,
                                  batch_size=batch_size, cache_mb=cache_mb, progress=progress)
        print(format_healed(healed))
    session.close()  # the store's write lock: nothing below writes to it

    _heading("3/5 surrogate: learn mask -> log-perplexity")
    surrogate = train_surrogate(store, surrogate_dir, members=members, seed=seed, hidden=hidden, progress=progress)
    print(training_report(surrogate.metadata["metrics"], members, seed, surrogate_dir))

    _heading("4/5 scores")
    record = score_surrogate(surrogate, scores_path, surrogate_dir=surrogate_dir,
                             progress=False if not progress else None, prog="layershap run")

    _heading("5/5 summary")
    summary = summarize(record, store, plans)
    if healed is not None:
        summary["healed_plans"] = {"heal": healed["heal"], "plans": healed["plans"]}
    print(format_summary(summary))
    write_json(out / "summary.json", summary)
    if register:
        from layershap.surrogate.registry import register_trained

        entry = register_trained(surrogate_dir, getattr(session.loaded.model.config, "model_type", None))
        print(f"registered the surrogate as {entry.family}/{entry.id} (layershap registry list)")
    print(f"\nwrote {out}/: dataset.zarr, decision-*.zarr, plans.json, surrogate/, scores.json (+ .png), "
          f"summary.json ({time.perf_counter() - started:.0f} s in all)")
    return summary


def summarize(record: ScoresRecord, store: DatasetStore, plans: dict) -> dict:
    """Per-layer rows (score, s.e., rank, leave-one-out perplexity), the plans, and the suggestions for 10/20/30 %
    depth reduction (the plan for that K, with the K lowest scores beside it for reference).

    Example:
        >>> print(format_summary(summarize(record, store, read_plans("runs/gemma-3-270m"))))  # doctest: +SKIP
    """
    scores = record.scores
    ranking = scores.ranking().tolist()
    n = scores.n_layers
    masks, nll = store.masks, store.nll
    full = masks.all(axis=1)
    full_nll = float(nll[full][0]) if full.any() else float("nan")
    loo = {int(np.flatnonzero(~m)[0]): float(v) for m, v in zip(masks, nll) if (~m).sum() == 1}
    rank = {layer: pos + 1 for pos, layer in enumerate(ranking)}
    layers = [{"layer": i, "score": float(scores.values[i]), "stderr": float(scores.stderr[i]),
               "rank": rank[i], "loo_perplexity": math.exp(loo[i]) if i in loo else None} for i in range(n)]
    by_k = {int(p["k"]): p for p in plans["plans"]}
    suggestions = []
    for frac in DEPTH_REDUCTIONS:
        k = max(1, round(frac * n))
        if k not in by_k:
            continue
        p = by_k[k]
        suggestions.append({
            "depth_reduction": frac, "remove": k, "layers": p["removed"], "measured_perplexity": p["perplexity"],
            "decision_perplexity": p["decision_perplexity"], "margin_se": p["margin_se"],
            "lowest_score_layers": sorted(int(i) for i in ranking[:k]),
        })
    game = {"game": store.game, "players": store.players} if store.game != "blocks" else {}
    return {"model_id": record.model_id, "n_layers": n, **game, "index": scores.index, "utility": store.utility,
            "full_perplexity": math.exp(full_nll), "layers": layers, "plans": plans["plans"],
            "plan_document": {key: plans[key] for key in ("utility", "calibration", "decision", "passes",
                                                          "decision_passes", "stopped", "full_perplexity", "full_nll")},
            "suggestions": suggestions}


def format_summary(summary: dict) -> str:
    """The table people read: layer, score ± s.e., rank, leave-one-out perplexity; then the suggestions.

    Example:
        >>> print(format_summary(summary))  # doctest: +SKIP
    """
    task = summary.get("utility") == "task"  # answer NLL in nats per question, no perplexity
    full = (f"full-model answer NLL {math.log(summary['full_perplexity']):.4f} nats per question" if task
            else f"full-model perplexity {summary['full_perplexity']:.2f}")
    title = (f"{summary['model_id']}: {summary['n_layers']} layers, {full}; scores = {summary['index']} of "
             f"-{summary.get('utility', 'nll')} (higher = more important)")
    if summary.get("game") == "sublayers":
        lines = [title.replace(f"{summary['n_layers']} layers", f"{summary['n_layers'] // 2} layers x "
                                                                   "(attention, MLP)"), *_sublayer_table(summary)]
    else:
        loo_head = "LOO NLL" if task else "LOO ppl"
        lines = [title, f"{'layer':>5}  {'score':>10}  {'± s.e.':>8}  {'rank':>4}  {loo_head:>10}"]
        for row in summary["layers"]:
            loo = ("-" if row["loo_perplexity"] is None else
                   f"{math.log(row['loo_perplexity']) if task else row['loo_perplexity']:.4g}")
            lines.append(f"{row['layer']:>5}  {row['score']:>10.4f}  {row['stderr']:>8.4f}  {row['rank']:>4}  "
                         f"{loo:>10}")
    lines.append("rank 1 = least important (removed first)")
    lines.append("")
    lowest = {int(p["k"]): sorted(int(i) for i in np.argsort([r["score"] for r in summary["layers"]],
                                                            kind="stable")[: int(p["k"])]) for p in summary["plans"]}
    names = summary.get("players")
    lines.append(format_plans({**summary["plan_document"], "plans": summary["plans"]}, lowest, names))
    for p in summary["plans"]:
        cost = p.get("removed_cost")
        if cost is not None:
            lines.append(f"  K = {p['k']} removes {cost['parameter_share']:.1%} of the decoder parameters "
                         f"({cost['parameters']:,}), {cost['flops_per_token']:,} FLOPs per token and "
                         f"{cost['kv_cache_share']:.0%} of the KV cache ({cost['kv_cache_bytes_per_token']:,} "
                         "bytes per token)")
    lines.append("depth reductions: " + "; ".join(
        f"{s['depth_reduction']:.0%} -> remove "
        f"{str([names[i] for i in s['layers']]).replace(chr(39), '') if names else s['layers']}"
        for s in summary["suggestions"]))
    return "\n".join(lines)


def _sublayer_table(summary: dict) -> list[str]:
    """One line per decoder layer: its attention's and its MLP's score ± s.e., rank and leave-one-out
    perplexity side by side (player ``2i`` is layer ``i``'s attention, ``2i + 1`` its MLP)."""
    def cells(row: dict) -> str:
        loo = f"{row['loo_perplexity']:.4g}" if row["loo_perplexity"] is not None else "-"
        return f"{row['score']:>10.4f}  {row['stderr']:>8.4f}  {row['rank']:>4}  {loo:>9}"

    head = f"{'score':>10}  {'± s.e.':>8}  {'rank':>4}  {'LOO ppl':>9}"
    lines = [f"{'':>5}  {'attention':^37}    {'MLP':^37}", f"{'layer':>5}  {head}    {head}"]
    rows = summary["layers"]
    for i in range(len(rows) // 2):
        lines.append(f"{i:>5}  {cells(rows[2 * i])}    {cells(rows[2 * i + 1])}")
    return lines
