"""Do the main job's plans hold on models layershap was not developed on? Plans vs SLEB and leave-one-out at equal
oracle tokens, over calibration seeds and utilities, on held-out text never used for any decision.

Models: the embedded default (Gemma-3-270M, 18 layers; calibration = the builtin text; held-out = the pruning
benchmark's GPL-3 / Vim manual / email essay, 4 x 256 tokens each) and deep planted models
(``benchmarks/planted.py``: 32 and 48 layers with cheap layers, cornerstones, a redundant and a cancelling pair and
an interacting triple; calibration and held-out texts sampled from the dense model, held-out at temperature 1 (same
domain) and 0.8 (shifted), 16 x 256 tokens each).

For each model, calibration seed and utility (``nll``, ``kl``), the main job's plan stage runs exactly as
``layershap run`` does (its stratified masks, the screening search, the races on decision blocks; its defaults
for the device, depth and K range). Its total oracle tokens ``T`` (stratified + screening + decision) are the
peers' budget: leave-one-out and SLEB (to the largest K) each measure on calibration windows of the same text and
seed, as many 256-token windows per pass as ``T`` affords them. Every chosen set is then measured on the held-out
texts. Printed per model and K: each method's sets per seed and, per held-out text, the plan's perplexity over the
best peer's (geometric mean over seeds; the worst seed in brackets), and for the planted models the ratio to the
held-out optimum (brute force over every set of K <= 2).

Rows are cached in stores under ``--data`` so a rerun only measures what is missing; each model's table is written
to ``--data/report-<model>.txt`` (and ``.json``).

Example:
    $ python benchmarks/plan_generalisation.py --models planted32,planted48 --seeds 0,1,2     # minutes
    $ python benchmarks/plan_generalisation.py --models gemma --seeds 0,1,2                   # hours on 2 CPU cores
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
import planted
from common import HELDOUT, heldout_text, layershap_run

from layershap.core.defaults import CALIBRATION_SEQ_LEN
from layershap.core.masks import masks_from_removed
from layershap.oracle.evaluate import MaskedEvaluator
from layershap.oracle.loading import load_model
from layershap.oracle.measure import CachedOracle, dataset_identity
from layershap.oracle.store import DatasetStore
from layershap.oracle.text import CalibrationText, eval_windows, load_text, make_windows
from layershap.pipeline.plans import default_ks
from layershap.pruning.baselines import leave_one_out, lowest, sleb

DATA = Path(__file__).parent / "data" / "plan_generalisation"
PEERS = ("leave-one-out", "SLEB")


def model_setup(name: str, cache: Path) -> dict:
    """Model spec, calibration text spec, held-out texts and their window shape for a model name."""
    if name == "gemma":
        return {"spec": "gemma-3-270m", "calib": "builtin",
                "heldout": {h: heldout_text(h) for h in HELDOUT}, "heldout_windows": 4}
    layers = int(name.removeprefix("planted"))
    folder = planted.build(cache / f"planted-{layers}", layers, seed=0)
    return {"spec": str(folder / "model"), "calib": str(folder / "calib.txt"), "roles": folder / "roles.json",
            "heldout": {h: load_text(str(folder / f"heldout-{h}.txt")) for h in ("same", "shift")},
            "heldout_windows": 16}


def cached_oracle(loaded, windows: np.ndarray, text_id: str, path: Path, label: str) -> CachedOracle:
    ident = dataset_identity(loaded, text_id, windows, windows.shape[1] - 1)
    store = DatasetStore.create_or_open(path, ident, windows)
    return CachedOracle(MaskedEvaluator(loaded.model, windows, batch_size=4), store, label=label, progress=False)


def peer_sets(loaded, calib: CalibrationText, n: int, ks: list[int], tokens: int, seed: int,
              folder: Path) -> dict[str, dict[int, tuple[int, ...]]]:
    """Leave-one-out and SLEB with ``tokens`` oracle tokens each, on 256-token windows of the calibration text."""
    out = {}
    passes = {"leave-one-out": n + 1, "SLEB": sum(n - k for k in range(max(ks))) + 1}
    for peer, count in passes.items():
        windows_n = max(1, tokens // (count * CALIBRATION_SEQ_LEN))
        windows = make_windows(loaded.tokenizer, calib.text, windows_n, CALIBRATION_SEQ_LEN, seed)
        oracle = cached_oracle(loaded, windows, calib.text_id, folder / f"peer-seed{seed}-{windows_n}x256.zarr", peer)
        if peer == "leave-one-out":
            damage, _ = leave_one_out(oracle, n)
            out[peer] = {k: lowest(damage, k) for k in ks}
        else:
            greedy = sleb(oracle, n, max(ks), progress=False)
            out[peer] = {k: greedy.removal(k) for k in ks}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="planted32,planted48,gemma")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--utilities", default="nll,kl")
    p.add_argument("--data", type=Path, default=DATA)
    args = p.parse_args()
    started = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    utilities = args.utilities.split(",")
    report: dict = {"models": {}}
    for name in args.models.split(","):
        folder = args.data / name
        setup = model_setup(name, args.data / "models")
        plans: dict = {}
        tokens: dict = {}
        for seed, utility in itertools.product(seeds, utilities):
            doc, spent = layershap_run(setup["spec"], setup["calib"], folder / f"seed{seed}-{utility}", seed, utility)
            plans[(seed, utility)] = {p["k"]: tuple(p["removed"]) for p in doc["plans"]}
            plans[(seed, utility, "margin")] = {p["k"]: p["margin_se"] for p in doc["plans"]}
            tokens[(seed, utility)] = spent
        loaded = load_model(setup["spec"], device="cpu")
        n = loaded.model.config.num_hidden_layers
        ks = default_ks(n)
        calib = load_text(setup["calib"])
        peers = {seed: peer_sets(loaded, calib, n, ks, max(tokens[(seed, u)] for u in utilities), seed, folder)
                 for seed in seeds}
        held = {}
        for h, text in setup["heldout"].items():
            windows = eval_windows(loaded.tokenizer, text.text, 256, setup["heldout_windows"])
            held[h] = cached_oracle(loaded, windows, text.text_id, folder / f"heldout-{h}.zarr", f"held-out {h}")
        optimum = {}
        if name != "gemma":  # brute force on the held-out text: every set of 1 and 2 layers
            for h, oracle in held.items():
                for k in (1, 2):
                    sets = list(itertools.combinations(range(n), k))
                    optimum[(h, k)] = float(np.min(oracle.loss(masks_from_removed(sets, n))))

        def ppl(h: str, s: tuple[int, ...], held=held, n=n) -> float:
            return math.exp(float(held[h].loss(masks_from_removed([s], n))[0]))

        lines = [(f"== {name}: {n} layers, K = {ks}; seeds {seeds}; held-out {list(held)} "
                  f"({setup['heldout_windows']} x 256 tokens each)")]
        lines.append("tokens per seed: " + ", ".join(f"seed {s} {u}: {tokens[(s, u)]:,}" for s, u in tokens))
        head = f"{'K':>3} {'method':<16} {'sets by seed':<44}" + "".join(
            f" | {h + ' x peer':>15} {'(worst)':>8}" + (f" {'x opt':>6}" if optimum else "") for h in held)
        lines.append(head)
        rows = []
        for k in ks:
            methods = {f"layershap {u}": [plans[(s, u)][k] for s in seeds] for u in utilities}
            methods.update({peer: [peers[s][peer][k] for s in seeds] for peer in PEERS})
            for method, sets in methods.items():
                line = f"{k:>3} {method:<16} {'; '.join(','.join(map(str, s)) for s in sets):<44}"
                row = {"k": k, "method": method, "sets": [list(s) for s in sets], "texts": {}}
                for h in held:
                    best_peer = [min(ppl(h, peers[s][peer][k]) for peer in PEERS) for s in seeds]
                    ratios = [ppl(h, st) / bp for st, bp in zip(sets, best_peer)]
                    gm = math.exp(np.mean(np.log(ratios)))
                    line += f" | {gm:>15.3f} {max(ratios):>8.3f}"
                    row["texts"][h] = {"x_peer_geomean": gm, "x_peer_worst": max(ratios),
                                       "ppl": [ppl(h, st) for st in sets]}
                    if optimum:
                        if k <= 2:
                            xo = math.exp(np.mean([math.log(ppl(h, st)) - optimum[(h, k)] for st in sets]))
                            line += f" {xo:>6.3f}"
                            row["texts"][h]["x_opt_geomean"] = xo
                        else:
                            line += f" {'-':>6}"
                lines.append(line)
                rows.append(row)
            margins = {u: [plans[(s, u, "margin")][k] for s in seeds] for u in utilities}
            lines.append(f"{'':>3} {'margins (se)':<16} " + "; ".join(
                f"{u}: " + ", ".join("-" if m is None else f"{m:.1f}" for m in ms) for u, ms in margins.items()))
        if "roles" in setup:
            lines.append(f"roles: {json.loads(Path(setup['roles']).read_text())}")
        print("\n".join(lines), flush=True)
        report["models"][name] = {"rows": rows, "tokens": {f"{s}-{u}": t for (s, u), t in tokens.items()},
                                  "lines": lines}
    args.data.mkdir(parents=True, exist_ok=True)
    for name, model in report["models"].items():  # one report per model, so runs of other models keep theirs
        (args.data / f"report-{name}.json").write_text(json.dumps(model, indent=2) + "\n")
        (args.data / f"report-{name}.txt").write_text("\n".join(model["lines"]) + "\n")
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
