"""How the choice of removal set depends on the calibration size (windows x tokens), judged on development texts.

For the embedded default (Gemma-3-270M) and every calibration config (``--configs``, ``TEXT:WxL``: W windows of
L tokens of TEXT, seed 0), every removal set of K = 1 and 2 layers is measured on the calibration windows (brute
force, 172 passes on 18 layers); every such set is also measured on development texts (``--dev``) from other
domains. The development texts are for choosing defaults; they are different texts from the ones
``pruning_quality.py`` reports, so the reported held-out figures stay untouched by the choice:

- ``mpl2``: the Mozilla Public Licence 2.0 (legal English);
- ``perldiag``: Perl's diagnostics manual, the first 4 x 256 tokens (technical reference).

Printed per config, K and development text: the calibration-optimal set, its development perplexity as a ratio
to the development optimum (regret), the best development ratio among the calibration top 3 (what choosing
among 3 candidates with perfect validation could reach), and the Spearman correlation of calibration vs
development nll over the sets of that K whose development perplexity stays below 1,000. Cost: tokens per pass
relative to 4 x 128. Rows are cached in stores under ``--data``, so reruns are cheap.

Measured (rows committed under ``data/calibration_size/``, ``report.txt``): at K = 2, 4 x 128 tokens picked a set
1.109x / 1.294x worse than the development optimum, 8 x 128 1.149x / 1.139x, and 2 x 256, 3 x 256 and 4 x 256 all
picked the same set, 1.055x / 1.000x; K = 1 was exact everywhere. 2 x 256 costs what 4 x 128 did, so it became
the default calibration (``layershap.core.defaults``).

Example:
    $ python benchmarks/calibration_size.py                      # ~60 min on 2 CPU cores, seconds when cached
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from layershap.core.masks import masks_from_removed
from layershap.oracle.evaluate import MaskedEvaluator
from layershap.oracle.loading import load_model
from layershap.oracle.measure import CachedOracle, dataset_identity
from layershap.oracle.store import DatasetStore
from layershap.oracle.text import CalibrationText, eval_windows, load_text, make_windows

DEV = {
    "mpl2": ("/usr/share/common-licenses/MPL-2.0", "legal: the Mozilla Public Licence 2.0"),
    "perldiag": ("/usr/share/perl/5.*/pod/perldiag.pod", "technical reference: Perl's diagnostics manual"),
}


def dev_text(name: str) -> CalibrationText:
    """A development text by name (the first file matching its pattern)."""
    pattern, _ = DEV[name]
    files = sorted(glob.glob(pattern))
    if not files:
        raise SystemExit(f"development text {name!r}: no file matches {pattern}; install the package that ships it")
    text = Path(files[0]).read_text(encoding="utf-8", errors="replace")
    return CalibrationText(f"dev:{name}@sha256:{hashlib.sha256(text.encode()).hexdigest()[:16]}", text)


def oracle_on(loaded, windows: np.ndarray, text_id: str, seq_len: int, path: Path, label: str) -> CachedOracle:
    ident = dataset_identity(loaded, text_id, windows, seq_len)
    store = DatasetStore.create_or_open(path, ident, windows)
    return CachedOracle(MaskedEvaluator(loaded.model, windows, batch_size=4), store, label=label, progress=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--configs", default="builtin:4x128,builtin:8x128,builtin:4x256,builtin:2x256,builtin:3x256")
    p.add_argument("--dev", default="mpl2,perldiag")
    p.add_argument("--dev-windows", type=int, default=4)
    p.add_argument("--dev-seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=3, help="candidates a validation step chooses among")
    p.add_argument("--data", type=Path, default=Path(__file__).parent / "data" / "calibration_size")
    args = p.parse_args()
    started = time.perf_counter()
    args.data.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.model, device="cpu")
    tok = loaded.tokenizer
    n = loaded.model.config.num_hidden_layers
    sets = {1: [(i,) for i in range(n)], 2: list(itertools.combinations(range(n), 2))}
    everything = [()] + sets[1] + sets[2]

    dev = {}
    for name in [d for d in args.dev.split(",") if d]:
        text = dev_text(name)
        ew = eval_windows(tok, text.text, args.dev_seq_len, args.dev_windows)
        oracle = oracle_on(loaded, ew, text.text_id, args.dev_seq_len, args.data / f"dev-{name}.zarr", f"dev {name}")
        dev[name] = dict(zip(everything, oracle.loss(masks_from_removed(everything, n))))

    report = {"model_id": loaded.model_id, "dev": {k: DEV[k][1] for k in dev}, "rows": []}
    header = (f"{'config':<16} {'cost':>5} {'K':>2} {'calib optimum':<14} {'calib ppl':>9}"
              + "".join(f" | {d + ' x opt':>13} {'top' + str(args.top) + ' x opt':>10} {'rho':>6}" for d in dev))
    lines = [header]
    for spec in [c for c in args.configs.split(",") if c]:
        text_spec, size = spec.rsplit(":", 1)
        w, L = (int(v) for v in size.split("x"))
        calib = load_text(text_spec)
        windows = make_windows(tok, calib.text, w, L, args.seed)
        path = args.data / f"{loaded.model_id}-{text_spec}-{w}x{L}-k2.zarr"
        cal_oracle = oracle_on(loaded, windows, calib.text_id, L, path, f"calibration {spec}")
        cal = dict(zip(everything, cal_oracle.loss(masks_from_removed(everything, n))))
        cost = w * L / 512
        for k in (1, 2):
            order = sorted(sets[k], key=lambda s: cal[s])
            best = order[0]
            line = f"{spec:<16} {cost:>5.2f} {k:>2} {list(best)!s:<14} {math.exp(cal[best]):>9.2f}"
            row = {"config": spec, "cost": cost, "k": k, "calib_optimum": list(best), "calib_ppl": math.exp(cal[best])}
            for d, vals in dev.items():
                opt = min(vals[s] for s in sets[k])
                regret = math.exp(vals[best] - opt)
                top = math.exp(min(vals[s] for s in order[: args.top]) - opt)
                ok = [s for s in sets[k] if vals[s] < math.log(1000)]
                rho = float(spearmanr([cal[s] for s in ok], [vals[s] for s in ok]).statistic)
                line += f" | {regret:>13.3f} {top:>10.3f} {rho:>6.3f}"
                row[d] = {"x_opt": regret, "top_x_opt": top, "spearman": rho, "n_sets": len(ok),
                          "dev_optimum": list(min(sets[k], key=lambda s: vals[s]))}
            lines.append(line)
            report["rows"].append(row)
    for d in dev:
        print(f"dev {d}: {DEV[d][1]}, {args.dev_windows} x {args.dev_seq_len} tokens; optimum K=1 "
              f"{list(min(sets[1], key=lambda s: dev[d][s]))}, K=2 {list(min(sets[2], key=lambda s: dev[d][s]))}")
    print("cost = tokens per oracle pass relative to 4 x 128; x opt = development ppl of the calibration optimum "
          f"/ development optimum; top{args.top} = the best of the calibration top {args.top}; rho = Spearman of "
          "calibration vs development nll over the sets with development ppl < 1,000")
    print("\n".join(lines))
    print(f"{time.perf_counter() - started:.0f} s")
    (args.data / "report.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
