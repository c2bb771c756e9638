"""Which masks does active sampling pick? The old rule (largest member spread in nats) against the new one
(members' spread of log-nll, one pick per band of predicted level within each removed-layer count), side by
side on the same candidate pool of a trained surrogate and its store (default: the committed Gemma-3-270M).

The pool is the one the first active round would draw (:func:`layershap.sampling.active.pick_uncertain`: up to
``--pool`` unmeasured stratified masks over the store's removed-layer counts, seed ``--seed + 1``), for
``--rounds`` seeds in a row. Printed per rule: the share of picks that remove a *cornerstone* layer (a layer
whose removal alone is measured above ``--cornerstone`` perplexity in the store) against the pool's share, the
removed-layer counts of the picks, and the quantiles of their predicted perplexity (the ensemble mean nll).
The log-nll spread without the level bands is shown too: the spread grows with the level in log-nll as well,
so the bands, not the log scale alone, spread the picks.

Example:
    $ python benchmarks/active_picks.py
    $ python benchmarks/active_picks.py --surrogate runs/x/surrogate --store runs/x/dataset.zarr --batch 64
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    from layershap.oracle.store import DatasetStore
    from layershap.pipeline.active import member_disagreement
    from layershap.sampling.active import available_masks, select_uncertain
    from layershap.sampling.stratified import stratified_masks
    from layershap.surrogate.checkpoint import load_surrogate

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--surrogate", default=str(ROOT / "artifacts/gemma-3-270m/surrogate"))
    p.add_argument("--store", default=str(ROOT / "artifacts/gemma-3-270m/dataset.zarr"))
    p.add_argument("--batch", type=int, default=32, help="picks per round (layershap run's default)")
    p.add_argument("--pool", type=int, default=4096, help="candidates per round (layershap run's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3, help="pools drawn with seeds seed+1, seed+2, ...")
    p.add_argument("--cornerstone", type=float, default=1e6, help="leave-one-out perplexity of a cornerstone")
    args = p.parse_args(argv)

    store, sur = DatasetStore.open(args.store), load_surrogate(args.surrogate)
    n, masks, nll = store.n_layers, store.masks, store.nll
    removed = (~masks).sum(axis=1)
    loo = {int(np.flatnonzero(~m)[0]): float(v) for m, v in zip(masks[removed == 1], nll[removed == 1])}
    corner = sorted(i for i, v in loo.items() if math.exp(v) > args.cornerstone)
    strata = sorted({int(r) for r in removed} - {0})
    rate = member_disagreement(sur)
    print(f"{args.surrogate}: {sur.members} members; store {len(store)} rows, removed counts {strata}; "
          f"cornerstone layers (alone > {args.cornerstone:g} perplexity): {corner}")
    quantiles = [0.1, 0.25, 0.5, 0.75, 0.9]
    head = f"{'round':>5} {'rule':>28} {'cornerstone share':>18} " + "".join(
        f"{f'ppl q{q:g}':>11}" for q in quantiles)
    print(head)
    for k in range(args.rounds):
        seed = args.seed + 1 + k
        pool = stratified_masks(n, min(args.pool, available_masks(masks, n, strata)), seed=seed, removed=strata,
                                include_loo=False, exclude=masks)
        mean_nll, nats_std = sur.predict(pool)
        log_spread, level = rate(pool)
        hit = ~pool[:, corner].all(axis=1)
        rules = {"pool (all candidates)": np.arange(len(pool)),
                 "old: spread in nats": select_uncertain(pool, nats_std, args.batch),
                 "log-nll spread, no bands": select_uncertain(pool, log_spread, args.batch),
                 "new: log-nll spread, banded": select_uncertain(pool, log_spread, args.batch, level=level)}
        for name, rows in rules.items():
            with np.errstate(over="ignore"):
                ppl = np.quantile(np.exp(mean_nll[rows]), quantiles)
            share = f"{hit[rows].sum()}/{len(rows)} = {hit[rows].mean():.0%}"
            print(f"{seed:>5} {name:>28} {share:>18} " + "".join(f"{v:>11.3g}" for v in ppl))
        for name in ("old: spread in nats", "new: log-nll spread, banded"):
            counts = np.bincount((~pool[rules[name]]).sum(axis=1), minlength=max(strata) + 1)[1:]
            print(f"{'':>5} {name:>28} picks per removed count 1..{max(strata)}: {counts.tolist()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
