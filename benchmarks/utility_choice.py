"""Which utility makes better depth-pruning decisions at equal cost: token NLL of the calibration text, or the KL
divergence to the dense model's next-token distributions (``--utility kl``, top-512 + tail)?

Every removal of 1 and 2 layers of the embedded default (Gemma-3-270M: 171 sets + the full model) is measured on
calibration windows of the builtin text (2 x 256 tokens, several seeds). One KL pass measures both utilities, on
the same windows, so both see the same tokens at the same cost. Each is judged on the **development** texts of
``benchmarks/calibration_size.py`` (MPL-2.0 and Perl's diagnostics manual, 4 x 256 tokens each; never the held-out
texts of the pruning benchmarks), per K and seed:

- ``rho``: Spearman correlation of the calibration utility with the development NLL over the sets whose development
  perplexity stays below 1,000 (how well the ranking carries over to another text);
- ``x opt``: development perplexity of the calibration-best set over the development optimum (the regret of
  deciding on this utility);
- ``seed rho``: Spearman correlation between the values of two calibration seeds (how much is noise).

Rows are cached in stores under ``--data`` (the development stores are calibration_size's, reused).

Example:
    $ python benchmarks/utility_choice.py                  # ~20 min on 2 CPU cores, seconds when cached
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
from calibration_size import DEV, dev_text, oracle_on
from scipy.stats import spearmanr

from layershap.core.masks import masks_from_removed
from layershap.oracle.evaluate import MaskedEvaluator
from layershap.oracle.loading import load_model
from layershap.oracle.measure import CachedOracle, dataset_identity
from layershap.oracle.store import DatasetStore
from layershap.oracle.text import eval_windows, load_text, make_windows

DATA = Path(__file__).parent / "data"


def kl_store(loaded, windows: np.ndarray, text_id: str, seq_len: int, path: Path) -> DatasetStore:
    """Every 1- and 2-layer removal measured once with the KL evaluator (its rows hold NLL and KL)."""
    ident = dataset_identity(loaded, text_id, windows, seq_len, utility="kl")
    store = DatasetStore.create_or_open(path, ident, windows)
    oracle = CachedOracle(MaskedEvaluator(loaded.model, windows, batch_size=4, utility="kl"), store,
                          label=path.stem, progress=True)
    n = loaded.model.config.num_hidden_layers
    oracle.loss(masks_from_removed([()] + list(itertools.combinations(range(n), 1))
                                   + list(itertools.combinations(range(n), 2)), n))
    return DatasetStore.open(path)


def by_set(store: DatasetStore, column: str) -> dict[tuple[int, ...], float]:
    values = getattr(store, column)
    return {tuple(int(i) for i in np.flatnonzero(~m)): float(v) for m, v in zip(store.masks, values)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--data", type=Path, default=DATA / "utility_choice")
    args = p.parse_args()
    started = time.perf_counter()
    args.data.mkdir(parents=True, exist_ok=True)
    loaded = load_model("gemma-3-270m", device="cpu")
    n = loaded.model.config.num_hidden_layers
    sets = {1: [(i,) for i in range(n)], 2: list(itertools.combinations(range(n), 2))}
    everything = [()] + sets[1] + sets[2]
    dev = {}
    for name in DEV:
        text = dev_text(name)
        ew = eval_windows(loaded.tokenizer, text.text, 256, 4)
        oracle = oracle_on(loaded, ew, text.text_id, 256, DATA / "calibration_size" / f"dev-{name}.zarr", name)
        dev[name] = dict(zip(everything, oracle.loss(masks_from_removed(everything, n))))
    calib = load_text("builtin")
    seeds = [int(s) for s in args.seeds.split(",")]
    measured = {}
    for seed in seeds:
        windows = make_windows(loaded.tokenizer, calib.text, args.windows, args.seq_len, seed)
        store = kl_store(loaded, windows, calib.text_id, args.seq_len,
                         args.data / f"builtin-{args.windows}x{args.seq_len}-seed{seed}.zarr")
        measured[seed] = {"nll": by_set(store, "nll"), "kl": by_set(store, "kl")}
    rows, lines = [], []
    header = (f"{'utility':<8} {'seed':>4} {'K':>2} {'calib best':<10}"
              + "".join(f" | {d + ' rho':>13} {'x opt':>6}" for d in dev))
    lines.append(header)
    summary: dict = {}
    for utility in ("nll", "kl"):
        for k in (1, 2):
            for seed in seeds:
                cal = measured[seed][utility]
                best = min(sets[k], key=lambda s: cal[s])
                line = f"{utility:<8} {seed:>4} {k:>2} {list(best)!s:<10}"
                row = {"utility": utility, "seed": seed, "k": k, "best": list(best)}
                for d, vals in dev.items():
                    ok = [s for s in sets[k] if vals[s] < math.log(1000)]
                    rho = float(spearmanr([cal[s] for s in ok], [vals[s] for s in ok]).statistic)
                    regret = math.exp(vals[best] - min(vals[s] for s in sets[k]))
                    line += f" | {rho:>13.3f} {regret:>6.3f}"
                    row[d] = {"spearman": rho, "x_opt": regret}
                    summary.setdefault((utility, k, d), []).append((rho, regret))
                lines.append(line)
                rows.append(row)
    lines.append("")
    lines.append(f"{'utility':<8} {'K':>2}" + "".join(f" | {d + ' mean rho':>15} {'geo x opt':>9}" for d in dev)
                 + " | seed rho")
    for utility in ("nll", "kl"):
        for k in (1, 2):
            line = f"{utility:<8} {k:>2}"
            for d in dev:
                vals = summary[(utility, k, d)]
                line += (f" | {np.mean([v[0] for v in vals]):>15.3f} "
                         f"{math.exp(np.mean([math.log(v[1]) for v in vals])):>9.3f}")
            pairs = [float(spearmanr([measured[a][utility][s] for s in sets[k]],
                                     [measured[b][utility][s] for s in sets[k]]).statistic)
                     for a, b in itertools.combinations(seeds, 2)]
            line += f" | {np.mean(pairs):.3f}"
            lines.append(line)
    print(f"calibration: builtin, {args.windows} x {args.seq_len} tokens, seeds {seeds}; development texts "
          f"{', '.join(f'{d} ({DEV[d][1]})' for d in dev)}, 4 x 256 tokens each")
    print("\n".join(lines))
    print(f"{time.perf_counter() - started:.0f} s")
    (args.data / "report.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    (args.data / "report.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
