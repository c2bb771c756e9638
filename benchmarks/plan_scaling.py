"""What the plan search costs on a deep model: screening passes and the search's own time for the default K
range of a random-weight Llama-shaped model (32 or 80 layers; small width: the oracle is the real masked forward
pass, the numbers that matter are the passes and the time outside it), against SLEB's greedy path on the same
oracle. The screening search alone (no decision blocks): the default budget for the depth on a CPU.

Prints, per K: the plan's screening nll, the passes (new oracle evaluations, shared by all K), the time spent
outside the oracle (proposal-model fits and ranking, scored by index), and SLEB's nll and passes.

Example:
    $ python benchmarks/plan_scaling.py --layers 80
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from layershap.core.masks import masks_from_removed
from layershap.oracle.evaluate import MaskedEvaluator
from layershap.oracle.measure import CachedOracle
from layershap.pipeline.plans import default_ks
from layershap.pruning.baselines import sleb
from layershap.pruning.budget import plan_budget
from layershap.pruning.plan import find_plans


class TimedOracle:
    """Counts the seconds spent inside the oracle, so the search's own time can be told apart."""

    def __init__(self, base: CachedOracle) -> None:
        self.base, self.n_layers, self.seconds = base, base.n_layers, 0.0

    def loss(self, masks: np.ndarray) -> np.ndarray:
        t = time.perf_counter()
        out = self.base.loss(masks)
        self.seconds += time.perf_counter() - t
        return out

    def rows(self):
        return self.base.rows()

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        return -self.loss(masks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=512, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    windows = np.random.default_rng(args.seed).integers(0, 512, size=(4, 65))
    n = args.layers
    ks = default_ks(n)
    oracle = TimedOracle(CachedOracle(MaskedEvaluator(model, windows, batch_size=4), progress=False))
    started = time.perf_counter()
    budget = plan_budget(n, ks)
    res = find_plans(oracle, ks, budget, seed=args.seed, progress=False)
    search_s = time.perf_counter() - started - oracle.seconds
    print(f"random-weight Llama, {n} layers (hidden {args.hidden}), K = {ks[0]}..{ks[-1]}; plan budget {args.budget}")
    print(f"plans: {res.passes} oracle passes for all K together, {len(res.rounds)} rounds, stopped: {res.stopped}; "
          f"search time outside the oracle {search_s:.1f} s (oracle {oracle.seconds:.1f} s)")
    sleb_oracle = CachedOracle(MaskedEvaluator(model, windows, batch_size=4), progress=False)
    greedy = sleb(sleb_oracle, n, ks[-1], progress=False)
    print(f"{'K':>3}  {'plan nll':>9}  {'SLEB nll':>9}  {'SLEB passes':>11}")
    for k in ks:
        sleb_nll = float(sleb_oracle.loss(masks_from_removed([greedy.removal(k)], n))[0])
        print(f"{k:>3}  {res.plans[k].loss:>9.4f}  {sleb_nll:>9.4f}  {greedy.passes[k - 1]:>11}")
    print(f"SLEB to K = {ks[-1]}: {greedy.passes[-1]} passes; plans for every K: {res.passes} passes")


if __name__ == "__main__":
    main()
