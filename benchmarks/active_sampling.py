"""Active sampling vs plain stratified sampling: oracle passes needed to reach a reference layer ranking.

1. Reference: a surrogate (``--reference-members`` members, to keep training noise out of the reference) trained
   on ``--reference`` stratified masks gives the reference scores (the index the data support: the
   pruning-range semivalue for the default strata).
2. Active: :func:`layershap.pipeline.active.run_active_sampling` from ``--initial`` stratified masks, adding
   ``--batch`` masks per round where the ensemble disagrees, until its ranking is stable or ``--budget`` is spent.
   Every round's surrogate (package defaults, as ``layershap run --budget`` trains it) is compared with the
   reference.
3. Stratified: surrogates (package defaults) trained on plain stratified sets of growing size (another seed
   than the reference).
4. Replicate: a second reference, the same way from ``--reference`` stratified masks of another seed. Its
   agreement with the first is the most any estimate can be expected to reach against the reference: the
   reference's own reproducibility.

"Reaches the reference" = Kendall tau >= 0.9 against the reference scores and the same 5 least-important layers
(the issue's criterion); "as close as the replicate" = tau against the reference >= tau(replicate, reference).
Every mask measured once is kept in ``--out/measured.zarr`` and reused by all three (an oracle pass is counted
per distinct mask each method asks for, whether or not it was already measured for another method).

Example:
    $ python benchmarks/active_sampling.py             # Gemma-3-270M, 4 x 128 tokens of builtin text (~50 min)
    $ python benchmarks/active_sampling.py --reuse runs/bench-active/measured.zarr      # reuse measured masks
    $ python benchmarks/active_sampling.py --reference 192 --initial 40 --batch 16 --budget 96 --sizes 48,96
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau

from layershap.surrogate.network import DEFAULT_HIDDEN


def scores_of(store_path: Path | None, out_dir: Path, args: argparse.Namespace, members: int | None = None):
    """Scores of the surrogate in ``out_dir``, trained there first on ``store_path`` unless that is None."""
    from layershap.shapley.estimate import compute_scores
    from layershap.shapley.semivalues import default_index
    from layershap.surrogate.checkpoint import load_surrogate
    from layershap.surrogate.metrics import not_validated
    from layershap.surrogate.train import train_surrogate

    if store_path is not None:
        train_surrogate(store_path, out_dir, members=members or args.members, seed=args.seed, hidden=args.hidden,
                        progress=False)
    sur = load_surrogate(out_dir)
    index = default_index(sur.removed_counts, sur.n_layers, not_validated(sur.metadata))
    return compute_scores(sur, sur.n_layers, index, method="auto", progress=False)


def agreement(scores, reference, top_k: int = 5) -> tuple[float, bool]:
    tau = float(kendalltau(reference.values, scores.values).statistic)
    same = set(scores.ranking()[:top_k].tolist()) == set(reference.ranking()[:top_k].tolist())
    return tau, same


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--reference", type=int, default=512, help="stratified masks behind the reference ranking")
    p.add_argument("--initial", type=int, default=64, help="initial stratified set of active sampling")
    p.add_argument("--batch", type=int, default=32, help="masks added per active round")
    p.add_argument("--budget", type=int, default=256, help="most oracle passes active sampling may spend "
                   "(target: reach the reference with at most half of --reference)")
    p.add_argument("--sizes", default="64,128,192,256", help="plain stratified set sizes to compare")
    p.add_argument("--members", type=int, default=8, help="members of the active and stratified surrogates")
    p.add_argument("--reference-members", type=int, default=10, help="members of the reference surrogate")
    p.add_argument("--hidden", type=int, default=DEFAULT_HIDDEN)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-active")
    p.add_argument("--reuse", default=None, help="an existing store on the same model and windows: its rows are "
                   "copied into the measurement cache first (saves model passes, counts are unchanged)")
    args = p.parse_args(argv)

    from layershap.oracle.evaluate import MaskedEvaluator
    from layershap.oracle.loading import load_model
    from layershap.oracle.measure import CachedOracle, dataset_identity
    from layershap.oracle.store import DatasetStore
    from layershap.oracle.text import load_text, make_windows
    from layershap.pipeline.active import run_active_sampling
    from layershap.sampling.stratified import stratified_masks

    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.model)
    text = load_text("builtin")
    windows = make_windows(loaded.tokenizer, text.text, args.windows, args.seq_len, args.seed)
    identity = dataset_identity(loaded, text.text_id, windows, args.seq_len)
    n = identity["n_layers"]
    evaluator = MaskedEvaluator(loaded.model, windows)
    cache = DatasetStore.create_or_open(out / "measured.zarr", identity, windows)
    oracle = CachedOracle(evaluator, cache, progress=False)  # each mask measured once, shared by all methods
    if args.reuse is not None:
        other = DatasetStore.open(args.reuse)
        other.check_identity({k: identity[k] for k in ("model_hash", "text_id", "windows_sha256", "n_layers", "dtype")})
        keep = cache.missing(other.masks)
        if keep.any():
            cache.append(other.masks[keep], other.nll[keep], other.seconds[keep])

    def store_for(name: str, masks: np.ndarray | None) -> Path:
        path = out / f"{name}.zarr"
        store = DatasetStore.create_or_open(path, identity, windows)
        if masks is not None:
            todo = masks[store.missing(masks)]
            if len(todo):
                store.append(todo, oracle.loss(todo), np.zeros(len(todo)))
        return path

    print(f"{loaded.model_id}: {n} layers; {args.windows} x {args.seq_len} tokens of {text.text_id}")
    ref_path = store_for("reference", stratified_masks(n, args.reference, seed=args.seed))
    reference = scores_of(ref_path, out / "reference-surrogate", args, members=args.reference_members)
    print(f"reference: {args.reference} stratified masks, index {reference.index}, "
          f"ranking (least important first) {reference.ranking().tolist()}")

    active_store = DatasetStore.create_or_open(out / "active.zarr", identity, windows)
    report = run_active_sampling(oracle, active_store, budget=args.budget, initial=args.initial, batch=args.batch,
                                 seed=args.seed + 1, members=args.members, hidden=args.hidden,
                                 out_dir=out / "active-rounds", progress=False)
    print(f"active: stopped '{report['stopped']}' after {len(report['rounds'])} rounds, {len(active_store)} oracle "
          f"passes ({report['criterion']['rule']})")
    active_rows = []
    for r in report["rounds"]:
        tau_ref, same_ref = agreement(scores_of(None, out / "active-rounds" / f"round_{r['round']:02d}", args),
                                      reference)
        active_rows.append((r["rows"], tau_ref, same_ref))
        tau = "  -  " if r["tau"] is None else f"{r['tau']:.3f}"
        print(f"  round {r['round']}: {r['rows']:4d} passes; vs reference tau {tau_ref:.3f}, same top-5 "
              f"{same_ref!s:5}; vs previous round tau {tau}, same top-5 {r['same_top_k']}")

    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        path = store_for(f"stratified-{size}", stratified_masks(n, size, seed=args.seed + 1))
        tau, same = agreement(scores_of(path, out / f"stratified-{size}-surrogate", args), reference)
        rows.append((size, tau, same))
        print(f"stratified {size:4d} passes: vs reference tau {tau:.3f}, same top-5 {same}")

    def first_reached(table: list[tuple[int, float, bool]]) -> int | None:
        hits = [passes for passes, tau, same in table if tau >= 0.9 and same]
        return min(hits) if hits else None

    rep_path = store_for("replicate", stratified_masks(n, args.reference, seed=args.seed + 2))
    replicate = scores_of(rep_path, out / "replicate-surrogate", args, members=args.reference_members)
    rep_tau, rep_same = agreement(replicate, reference)
    print(f"replicate: {args.reference} stratified masks of another seed vs the reference: tau {rep_tau:.3f}, "
          f"same top-5 {rep_same} (the reference's own reproducibility)")

    def first_as_close(table: list[tuple[int, float, bool]]) -> int | None:
        hits = [passes for passes, tau, _ in table if tau >= rep_tau]
        return min(hits) if hits else None

    first_active, first_strat = first_reached(active_rows), first_reached(rows)
    print(f"passes to reach the reference (tau >= 0.9, same top-5): active {first_active or 'not reached'} "
          f"(budget {args.budget}), stratified {first_strat or 'not reached'} (of sizes {args.sizes}); "
          f"reference {args.reference} passes")
    if first_active:
        print(f"active / reference passes: {first_active / args.reference:.2f} (target <= 0.5)"
              + (f"; active / stratified: {first_active / first_strat:.2f}" if first_strat else ""))
    close_active, close_strat = first_as_close(active_rows), first_as_close(rows)
    print(f"passes to agree with the reference as closely as the replicate (tau >= {rep_tau:.3f}): active "
          f"{close_active or 'not reached'}, stratified {close_strat or 'not reached'}; replicate {args.reference}")
    if close_active:
        print(f"active / replicate passes: {close_active / args.reference:.2f} (<= 0.5 = half the passes)")
    print(f"{len(cache)} distinct masks measured in all; {time.perf_counter() - started:.0f} s")
    (out / "active_vs_stratified.json").write_text(json.dumps({
        "reference": {"masks": args.reference, "index": reference.index, "ranking": reference.ranking().tolist()},
        "active": {"passes": len(active_store), "first_reached": first_active,
                   "rounds_vs_reference": [{"passes": p, "tau": t, "same_top5": m} for p, t, m in active_rows],
                   "report": report},
        "stratified": [{"masks": s, "tau": t, "same_top5": m} for s, t, m in rows], "first_reached": first_strat,
        "replicate": {"masks": args.reference, "tau": rep_tau, "same_top5": rep_same,
                      "ranking": replicate.ranking().tolist(), "active_as_close": close_active,
                      "stratified_as_close": close_strat},
    }, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
