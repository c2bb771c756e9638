"""Time layer-score estimators on a randomly initialised surrogate (a script, not a test).

Exact enumeration of all 2^n masks for n = 18, 20, 22, 24 and Monte Carlo (paired permutation and
size-stratified sampling) at n = 32 and 64 with a fixed budget, on the surrogate network layershap trains
(``MaskNet``: n -> hidden -> hidden -> 1 with SiLU, hidden = the training default, plus a linear skip path),
queried through ``Surrogate`` exactly as
``layershap shapley`` does. Prints a table.

Example:
    $ .venv/bin/python benchmarks/shapley_speed.py                       # full table
    $ .venv/bin/python benchmarks/shapley_speed.py --exact 18 20 --mc 32 --budget 200000
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from layershap.shapley.exact import exact_semivalue
from layershap.shapley.montecarlo import permutation_shapley, stratified_semivalue
from layershap.shapley.semivalues import Index
from layershap.surrogate.checkpoint import Surrogate
from layershap.surrogate.network import DEFAULT_HIDDEN, MaskNet


def random_surrogate(n: int, hidden: int, seed: int = 0) -> Surrogate:
    """An untrained one-member surrogate with the training code's architecture (weights from ``seed``)."""
    torch.manual_seed(seed)
    net = MaskNet(n, hidden=hidden, depth=2)
    meta = {"n_layers": n, "target": "log_nll", "target_mean": 1.0, "target_std": 0.5,
            "removed_counts": list(range(n + 1)), "model_id": f"random-{n}"}
    return Surrogate([net], meta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exact", type=int, nargs="*", default=[18, 20, 22, 24], help="n for exact enumeration")
    parser.add_argument("--mc", type=int, nargs="*", default=[32, 64], help="n for Monte Carlo")
    parser.add_argument("--budget", type=int, default=1_000_000, help="Monte Carlo evaluations")
    parser.add_argument("--hidden", type=int, default=DEFAULT_HIDDEN)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()

    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} at start")
    print(f"surrogate: layershap.surrogate.network.MaskNet (n -> {args.hidden} -> {args.hidden} -> 1, SiLU, "
          "+ linear skip), random init, queried through layershap.surrogate.checkpoint.Surrogate")
    rows = []
    for n in args.exact:
        sur = random_surrogate(n, args.hidden)
        t = time.perf_counter()
        s = exact_semivalue(sur, n, Index("shapley"), progress=args.progress)
        sec = time.perf_counter() - t
        rows.append((n, "exact shapley", s.n_evals, sec, s.extra["efficiency"]["rel_error"]))
        print(rows[-1], flush=True)
    for n in args.mc:
        sur = random_surrogate(n, args.hidden)
        for name in ("mc-permutation shapley", "mc-stratified shapley"):
            t = time.perf_counter()
            if name.startswith("mc-permutation"):
                s = permutation_shapley(sur, n, args.budget, seed=0, progress=args.progress)
            else:
                s = stratified_semivalue(sur, n, args.budget, Index("shapley"), seed=0, progress=args.progress)
            sec = time.perf_counter() - t
            rows.append((n, name, s.n_evals, sec, float(s.stderr.mean())))
            print(rows[-1], flush=True)
    print(f"\n{'n':>3}  {'method':<24} {'evaluations':>12} {'seconds':>9} {'evals/s':>11}  note")
    for n, name, evals, sec, note in rows:
        label = f"efficiency rel. error {note:.1e}" if name.startswith("exact") else f"mean s.e. {note:.2e}"
        print(f"{n:>3}  {name:<24} {evals:>12,} {sec:>9.2f} {evals / sec:>11,.0f}  {label}")
    print(f"load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
