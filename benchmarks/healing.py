"""How much of the damage of depth pruning the training-free healing methods repair, on held-out text.

On the embedded default (Gemma-3-270M, 18 layers), for the main job's plans at K = 2 / 4 / 5 (the committed
``artifacts/gemma-3-270m/plans.json``, or ``--plans``), each method of ``layershap heal`` is fitted on calibration windows of the
builtin text (Python's reference documentation; ``--windows`` x ``--seq-len`` tokens, seed 0) and the healed
model is scored on the pruning benchmark's held-out texts (GPL-3, Vim manual, CPython's email essay; 4 x 256
tokens each, never used for calibration). Printed per plan and method: held-out perplexity, the share of the
log-perplexity gap to the dense model the method closes ((nll_unhealed - nll_healed) / (nll_unhealed -
nll_dense)), calibration tokens, fit seconds, the saved form (fused into ``down_proj`` or custom code) and the
parameters the patches add (``distill``: LoRA merged, none). ``--sweep`` also refits ``linear`` at K = 4 on more and
fewer calibration windows, to show how many tokens pay. Beside each plan, two anchors run by layershap's own code
under the same protocol: ReplaceMe's choice (the contiguous span of K layers with the lowest cosine distance
between its input and output hidden states on the calibration windows) healed with ``linear``, and SLEB's
greedy set (on ``--sleb-windows`` of the calibration windows) healed with the method that closed the most on
the plan.

The heal-aware plans (``--heal-plans``: ``layershap plan --heal linear`` run on a copy of the main job's folder,
so its unhealed plans are the same) are healed with every method too.

Example:
    $ cp -r artifacts/gemma-3-270m benchmarks/data/healing/main-job      # dataset.zarr, decision-*.zarr, plans.json
    $ layershap plan --remove 2,4,5 --heal linear --out benchmarks/data/healing/main-job     # ~25 min on 2 cores
    $ python benchmarks/healing.py                              # ~15 min on 2 CPU cores
    $ python benchmarks/healing.py --plans 6,7,8,9 --methods linear --sweep 8,16,32,64
    $ python benchmarks/healing.py --plans 6,7,8,9 --methods linear,distill --distill-steps 200
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from common import HELDOUT, heldout_nll, heldout_text

from layershap.core.masks import masks_from_removed
from layershap.oracle.evaluate import MaskedEvaluator
from layershap.oracle.loading import load_model
from layershap.oracle.text import eval_windows, load_text, make_windows
from layershap.pruning.baselines import hidden_state_similarity, sleb
from layershap.pruning.distill import distill
from layershap.pruning.heal import fit_healing, healing_applied
from layershap.pruning.heal_save import saved_form

PLANS_FROM = Path(__file__).resolve().parent.parent / "artifacts" / "gemma-3-270m" / "plans.json"
PLAN_KS = (2, 4, 5)
HEAL_PLANS_FROM = Path(__file__).resolve().parent / "data" / "healing" / "main-job" / "heal-linear" / "plans.json"


def main_job_plans(path: Path = PLANS_FROM) -> dict[int, tuple[int, ...]]:
    """The committed main job's plans at :data:`PLAN_KS`."""
    doc = json.loads(path.read_text())
    return {int(p["k"]): tuple(p["removed"]) for p in doc["plans"] if int(p["k"]) in PLAN_KS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--text", default="builtin", help="calibration text")
    p.add_argument("--windows", type=int, default=16, help="calibration windows for the fits")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--methods", default="bias,linear,lowrank:64")
    p.add_argument("--plans", default=None, help="one removal set, e.g. 6,7,8,9 (default: the K = 2/4/5 plans)")
    p.add_argument("--heldout", default="gpl3,vim,email")
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--ridge", type=float, default=None, help="ridge of the linear fits (default: layershap's)")
    p.add_argument("--sweep", default="", help="calibration window counts to refit linear at K = 4 with")
    p.add_argument("--distill-steps", type=int, default=100, help="training steps of the distill method")
    p.add_argument("--distill-lr", type=float, default=1e-4)
    p.add_argument("--heal-plans", type=Path, default=HEAL_PLANS_FROM,
                   help="plans.json of `layershap plan --heal linear` (made by this script's example when missing)")
    p.add_argument("--no-anchors", dest="anchors", action="store_false", help="skip ReplaceMe's span and SLEB's set")
    p.add_argument("--sleb-windows", type=int, default=4, help="calibration windows SLEB's greedy passes measure")
    args = p.parse_args()
    torch.manual_seed(0)
    loaded = load_model(args.model, device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    calib = load_text(args.text)
    names = args.heldout.split(",")
    ev = {h: eval_windows(tok, heldout_text(h).text, args.eval_seq_len, args.eval_windows) for h in names}
    plans = {len(s): s for s in [tuple(int(i) for i in args.plans.split(","))]} if args.plans else main_job_plans()
    extra = {} if args.ridge is None else {"ridge": args.ridge}
    n = model.config.num_hidden_layers
    dense = heldout_nll(model, ev)
    print(f"{loaded.model_id}: {n} layers; calibration {calib.text_id}, {args.windows} x {args.seq_len} tokens; "
          f"held-out {', '.join(f'{h} ({HELDOUT[h][1]})' for h in names)}, {args.eval_windows} x "
          f"{args.eval_seq_len} tokens each")
    print("dense perplexity: " + " / ".join(f"{math.exp(dense[h]):.1f}" for h in names))
    cal_windows = make_windows(tok, calib.text, args.windows, args.seq_len, seed=0)
    header = f"{'K':>2} {'set':<22} {'method':<11} {'perplexity ' + '/'.join(names):<30} {'gap closed':<20}"
    print(header + f" {'tokens':>7} {'fit s':>6} {'saved as':<12} {'+params':>8}")

    def rows(k: int, label: str, plan: tuple[int, ...], runs: list[tuple[str, int]]) -> dict[str, float]:
        """Print the unhealed row and one row per (method, calibration windows); the mean gap closed of each."""
        mask = masks_from_removed(list(plan), n)[0]
        unhealed = heldout_nll(model, ev, mask)
        shown = f"{label} {{{', '.join(map(str, plan))}}}".strip()
        print(f"{k:>2} {shown:<22} {'none':<11} "
              f"{' / '.join(f'{math.exp(unhealed[h]):.1f}' for h in names):<30} {'-':<20}")
        mean_closed = {}
        for method, n_windows in runs:
            windows = cal_windows if n_windows == args.windows else make_windows(
                tok, calib.text, n_windows, args.seq_len, seed=0)
            start = time.perf_counter()
            if method == "distill":
                student, record = distill(model, windows, plan, steps=args.distill_steps, lr=args.distill_lr,
                                          progress=False)
                fit_s, n_tokens, form, params = time.perf_counter() - start, record["calibration_tokens"], "merged", 0
                healed = heldout_nll(student, ev)
                del student
            else:
                healing = fit_healing(model, windows, plan, method, progress=False, **extra)
                fit_s, n_tokens = time.perf_counter() - start, healing.n_tokens
                with healing_applied(model, healing):
                    healed = heldout_nll(model, ev)
                form = saved_form(model.config.model_type, healing)
                params = sum(sum(a.size for a in (s.delta, s.down, s.up, s.bias) if a is not None)
                             for s in healing.spans) if form != "fused" else 0
            closed = [(unhealed[h] - healed[h]) / (unhealed[h] - dense[h]) for h in names]
            if n_windows == args.windows:
                mean_closed[method] = float(np.mean(closed))
            print(f"{k:>2} {'':<22} {method:<11} {' / '.join(f'{math.exp(healed[h]):.1f}' for h in names):<30} "
                  f"{' / '.join(f'{100 * c:.0f}%' for c in closed):<20} {n_tokens:>7} {fit_s:>6.1f} "
                  f"{form:<12} {params / 1e6:>7.2f}M", flush=True)
        return mean_closed

    # The anchors, by layershap's own code under the same protocol: ReplaceMe's span (the contiguous k layers of
    # lowest cosine distance between the span's input and output states) healed by its own linear map, and
    # SLEB's greedy set healed by the method that closed the most on the plan.
    stats = hidden_state_similarity(model, cal_windows, progress=False) if args.anchors else None
    greedy = sleb(MaskedEvaluator(model, cal_windows[: args.sleb_windows], batch_size=2), n, max(plans),
                  progress=False) if args.anchors else None
    methods = args.methods.split(",")
    healed_plans = main_job_plans(args.heal_plans) if args.heal_plans.is_file() else {}
    if healed_plans:
        print(f"heal-aware plans from {args.heal_plans} (`layershap plan --heal linear`: every candidate measured "
              "after its linear healing)")
    for k, plan in plans.items():
        runs = [(m, args.windows) for m in methods]
        if k == 4 and args.sweep:
            runs += [("linear", int(w)) for w in args.sweep.split(",") if int(w) != args.windows]
        closed = rows(k, "plan", plan, runs)
        aware = healed_plans.get(k)
        if aware is not None and aware != tuple(sorted(plan)):
            rows(k, "heal-aware", aware, [(m, args.windows) for m in methods])
        elif aware is not None:
            print(f"{k:>2} {'heal-aware: the same set':<22}")
        if stats is None or greedy is None:
            continue
        start = int(np.argmin([1.0 - stats.cosine[i, i + k] for i in range(n - k + 1)]))
        rows(k, "ReplaceMe", tuple(range(start, start + k)), [("linear", args.windows)])
        best = max(closed, key=closed.get) if closed else "linear"
        rows(k, "SLEB", tuple(sorted(greedy.removal(k))), [(best, args.windows)])
    if greedy is not None:
        print(f"SLEB measured on {args.sleb_windows} of the calibration windows ({greedy.passes[-1]} passes); the "
              "ReplaceMe span from the cosine distances of the dense model's hidden states on all of them")

if __name__ == "__main__":
    main()
