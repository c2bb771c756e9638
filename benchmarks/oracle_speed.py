"""Oracle speed: plain Hugging Face ``labels=`` forwards vs layershap's oracle, on the same masks and windows.

The oracle side is what ``layershap oracle`` runs: ``measure_masks`` with a ``MaskedEvaluator`` into a (temporary)
zarr store, trie-ordered groups of masks with prefix sharing, every group's rows committed as it finishes.

With ``--kl`` it also times the same oracle with ``utility="kl"`` (divergence to the dense model's top-k next-token
distributions, from the same head pass) and prints its cost over the NLL oracle's (target <= 1.2), and what the
top-k approximation costs: top-k KL against the exact KL of plain full-logit forwards on the first masks.

Prints the time and masks/s of each path, their ratio, the largest NLL difference between them, the oracle's
throughput against this machine's own measured matmul rate in the model's dtype for the same FLOPs (a roofline
fraction; with ``--peak-tflops`` also against a datasheet peak), and a cost model of the reference recipe
(8,000 masks x 32 layers x 1,280 tokens) in GPU-hours on one GPU and on ``--gpus`` Ray workers.

FLOPs counted for a masked forward: 2 x (matmul parameters of the kept layers) x (all tokens) + 2 x (head
parameters) x (predicted tokens). Attention score/value products and norms are not counted (about 2 % at 128
tokens). "Nominal" FLOPs count every mask's full masked forward; "computed" FLOPs count what the oracle really
ran after prefix sharing (so nominal throughput can exceed the matmul rate).

Example:
    $ python benchmarks/oracle_speed.py                                  # Gemma-3-270M, 128 masks, 4 x 128 tokens
    $ python benchmarks/oracle_speed.py --masks-n 32 --windows 2
    $ python benchmarks/oracle_speed.py --masks-n 48 --windows 2 --seq-len 256 --kl      # the KL utility's cost
    $ python benchmarks/oracle_speed.py --config benchmarks/configs/llama-3-8b.json --device cuda \
          --windows 10 --seq-len 128 --peak-tflops 989 --gpus 8      # random bf16 weights, H100 SXM dense peak
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m", help="model spec for layershap.oracle.loading.load_model")
    p.add_argument("--config", default=None, help="config.json (file or folder): random-weight model of that shape")
    p.add_argument("--masks-n", type=int, default=128, help="stratified masks (full + leave-one-out included)")
    p.add_argument("--windows", type=int, default=4, help="token windows")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window (BOS added when the model has one)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (both paths)")
    p.add_argument("--cache-mb", type=float, default=None, help="prefix-cache budget (default: evaluator default)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpus", type=int, default=8, help="GPUs (one Ray worker each) for the cost model (default 8)")
    p.add_argument("--kl", action="store_true", help="also time the KL utility and check its top-k approximation")
    p.add_argument("--top-k", type=int, default=512, help="dense next-token log-probabilities kept for --kl")
    p.add_argument("--exact-masks", type=int, default=12, help="masks whose top-k KL is checked against exact KL")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="datasheet dense matmul peak of the device in the model's dtype, TFLOP/s (e.g. 989 for an "
                        "H100 SXM in bf16); adds the fraction of it the oracle reaches")
    return p.parse_args(argv)


# The reference recipe the cost model prices: masks x decoder layers x tokens per mask.
RECIPE_MASKS, RECIPE_LAYERS, RECIPE_TOKENS = 8000, 32, 1280


def print_cost_model(per_layer_params: float, head_params: float, kept_fraction: float, flops_per_s: float,
                     load_s: float, gpus: int, unit: str = "GPU") -> None:
    """Price the reference recipe at ``flops_per_s`` (nominal FLOPs per second of one GPU's oracle).

    Nominal FLOPs per mask: 2 x (kept layers' matmul parameters + head parameters) x tokens, with the layer size
    of the benchmarked model and the kept fraction of its stratified masks. Workers share nothing but masks and
    results, so N GPUs divide the measuring time; each also loads the model once (``load_s``).
    """
    per_mask = 2.0 * (kept_fraction * RECIPE_LAYERS * per_layer_params + head_params) * RECIPE_TOKENS
    hours = RECIPE_MASKS * per_mask / flops_per_s / 3600
    load_h = load_s / 3600
    print(f"cost model, reference recipe {RECIPE_MASKS} masks x {RECIPE_LAYERS} layers x {RECIPE_TOKENS} tokens "
          f"(layers of this model's size, {kept_fraction:.0%} kept on average):")
    print(f"  {per_mask / 1e12:.3f} TFLOP per mask nominal; at this run's {flops_per_s / 1e12:.3f} TFLOP/s nominal "
          f"oracle throughput: {per_mask / flops_per_s:.3f} s/mask")
    print(f"  {'1 x ' + unit:<12}: {hours + load_h:8.2f} {unit}-hours, {hours + load_h:8.2f} h wall "
          f"(model load/build {load_s:.0f} s)")
    print(f"  {f'{gpus} x ' + unit:<12}: {hours + gpus * load_h:8.2f} {unit}-hours, "
          f"{hours / gpus + load_h:8.2f} h wall (Ray workers, one model copy each, loaded in parallel)")


def build_from_config(path: str, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """A random-weight causal LM from a config.json file or a folder holding one."""
    from transformers import AutoConfig, AutoModelForCausalLM

    file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    values = json.loads(file.read_text())
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


class CountingEvaluator:
    """Passes ``measure`` calls to a MaskedEvaluator and adds up its prefix-sharing statistics over the calls."""

    def __init__(self, evaluator) -> None:
        self.evaluator = evaluator
        self.n_layers = evaluator.n_layers
        self.utility = evaluator.utility
        self.stats = {"layer_runs": 0, "plain_layer_runs": 0, "slots": 0, "peak_cache_bytes": 0}

    def measure(self, masks: np.ndarray):
        values = self.evaluator.measure(masks)
        last = self.evaluator.last_stats
        for key in ("layer_runs", "plain_layer_runs"):
            self.stats[key] += last[key]
        for key in ("slots", "peak_cache_bytes"):
            self.stats[key] = max(self.stats[key], last[key])
        return values


def identity(model: torch.nn.Module, windows: np.ndarray, label: str) -> dict:
    """Store identity attributes for the benchmark's temporary store."""
    from layershap.oracle.layers import find_layers, layer_types
    from layershap.oracle.text import windows_sha256

    return {"model_id": label, "model_hash": "benchmark", "n_layers": find_layers(model).n_layers,
            "layer_types": layer_types(model), "text_id": "benchmark", "windows_sha256": windows_sha256(windows),
            "n_windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]) - 1,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}


def load(args: argparse.Namespace) -> tuple[torch.nn.Module, np.ndarray, str]:
    from layershap.oracle.evaluate import default_dtype, resolve_device

    device = resolve_device(args.device)
    if args.config is not None:
        model = build_from_config(args.config, device, default_dtype(device), args.seed)
        vocab = model.get_output_embeddings().out_features
        rng = np.random.default_rng(args.seed)
        windows = rng.integers(0, vocab, size=(args.windows, args.seq_len), dtype=np.int64)
        bos = getattr(model.config, "bos_token_id", None)
        if isinstance(bos, int):
            windows = np.concatenate([np.full((args.windows, 1), bos, np.int64), windows], axis=1)
        return model, windows, f"random weights from {args.config}"
    from layershap.oracle.loading import load_model
    from layershap.oracle.text import load_text, make_windows

    loaded = load_model(args.model, device=args.device)
    text = load_text("builtin")
    windows = make_windows(loaded.tokenizer, text.text, args.windows, args.seq_len, args.seed)
    return loaded.model, windows, f"{loaded.model_id} ({loaded.model_hash[:12]}), text {text.text_id}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(
    m: int, k: int, n: int, device: torch.device, dtype: torch.dtype, seconds: float = 1.0
) -> tuple[float, float]:
    """Measured ``torch.mm`` rate for ``[m, k] @ [k, n]``: (GFLOP per wall second, GFLOP per CPU second of this
    process), medians of 5 timed bursts."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    torch.mm(a, b)
    sync(device)
    start = time.perf_counter()
    reps = 0
    while time.perf_counter() - start < seconds / 5 or reps < 2:
        torch.mm(a, b)
        reps += 1
    sync(device)
    reps = max(1, int(reps * seconds / 5 / max(time.perf_counter() - start, 1e-9)))
    rates, cpu_rates = [], []
    for _ in range(5):
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(reps):
            torch.mm(a, b)
        sync(device)
        rates.append(2.0 * m * k * n * reps / (time.perf_counter() - start) / 1e9)
        cpu_rates.append(2.0 * m * k * n * reps / max(time.process_time() - cpu, 1e-9) / 1e9)
    return statistics.median(rates), statistics.median(cpu_rates)


def plain_nll(model, windows: torch.Tensor, masks: np.ndarray, batch_size: int, progress: bool = True) -> np.ndarray:
    """Mean NLL per mask from ``model(ids, labels=ids).loss`` with the masked layers skipped (full logits)."""
    from tqdm.auto import tqdm

    from layershap.oracle.layers import skip_layers

    device = next(model.parameters()).device
    ids = windows.to(device)
    per_token = ids.shape[1] - 1
    out = torch.zeros(len(masks), dtype=torch.float64, device=device)
    with torch.inference_mode():
        for i, mask in enumerate(tqdm(masks, desc="plain HF labels=", unit="mask", disable=not progress)):
            with skip_layers(model, mask):
                for start in range(0, ids.shape[0], batch_size):
                    batch = ids[start : start + batch_size]
                    loss = model(batch, labels=batch, use_cache=False).loss
                    out[i] += loss.double() * (batch.shape[0] * per_token)
    return (out / (ids.shape[0] * per_token)).cpu().numpy()


def matmul_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.ndim >= 2)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from layershap.oracle.evaluate import MaskedEvaluator
    from layershap.oracle.layers import find_layers
    from layershap.oracle.measure import measure_masks
    from layershap.oracle.store import DatasetStore
    from layershap.sampling.stratified import stratified_masks

    started = time.perf_counter()
    model, windows_np, label = load(args)
    load_s = time.perf_counter() - started
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    layers = find_layers(model).layers
    n = len(layers)
    masks = stratified_masks(n, args.masks_n, seed=args.seed)
    windows = torch.as_tensor(windows_np)
    n_win, length = windows.shape
    head = model.get_output_embeddings()
    vocab, hidden = head.weight.shape
    print(f"model: {label}; {n} layers, hidden {hidden}, vocab {vocab}, {dtype} on {device}, "
          f"attention {getattr(model.config, '_attn_implementation', '?')}, torch threads {torch.get_num_threads()}")
    print(f"masks: {len(masks)} stratified (seed {args.seed}), {int((~masks).sum())} layer removals; "
          f"windows: {n_win} x {length} tokens, batch {args.batch_size}; load average {os.getloadavg()[0]:.1f}")

    # FLOPs of the masked forwards.
    per_layer = np.array([matmul_params(layer) for layer in layers], dtype=np.float64)
    tokens, predicted = n_win * length, n_win * (length - 1)
    head_flops = 2.0 * vocab * hidden * predicted
    layer_flops = 2.0 * float((masks @ per_layer).sum()) * tokens

    # Warm-up (allocator, kernels), not timed, same for both paths.
    evaluator = MaskedEvaluator(model, windows_np, batch_size=args.batch_size, cache_mb=args.cache_mb)
    plain_nll(model, windows, masks[:1], args.batch_size, progress=False)
    evaluator.nll(masks[:1])

    inter = getattr(model.config.get_text_config(), "intermediate_size", 4 * hidden)
    # The head tile the evaluator really multiplies: several masks' tokens stacked, at most token_chunk rows.
    per_mask = min(args.batch_size, n_win) * (length - 1)
    head_m = min(evaluator.token_chunk, max(1, evaluator.token_chunk // per_mask) * per_mask)
    layer_shape, head_shape = (tokens, hidden, inter), (head_m, hidden, evaluator.vocab_chunk)
    rates = {"layer": [matmul_rate(*layer_shape, device, dtype)], "head": [matmul_rate(*head_shape, device, dtype)]}

    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    plain = plain_nll(model, windows, masks, args.batch_size)
    sync(device)
    t_plain, c_plain = time.perf_counter() - start, time.process_time() - cpu

    counted = CountingEvaluator(evaluator)
    with tempfile.TemporaryDirectory() as tmp:
        store = DatasetStore.create_or_open(Path(tmp) / "bench.zarr", identity(model, windows_np, label), windows_np)
        start, cpu = time.perf_counter(), time.process_time()
        measure_masks(counted, store, masks)  # what `layershap oracle` runs: trie-ordered groups, rows committed
        sync(device)
        t_fast, c_fast = time.perf_counter() - start, time.process_time() - cpu
        lookup = {row.tobytes(): v for row, v in zip(store.masks, store.nll)}
        fast = np.array([lookup[row.tobytes()] for row in masks])
    stats = counted.stats

    rates["layer"].append(matmul_rate(*layer_shape, device, dtype))
    rates["head"].append(matmul_rate(*head_shape, device, dtype))
    share = stats["layer_runs"] / max(stats["plain_layer_runs"], 1)
    heads = len(masks) * head_flops
    computed = layer_flops * share + heads

    def roofline_seconds(kind: int, layer_part: float) -> float:
        """Seconds torch.mm needs for these FLOPs (kind 0: wall-clock rate, 1: CPU-time rate)."""
        r_layer = statistics.mean(r[kind] for r in rates["layer"])
        r_head = statistics.mean(r[kind] for r in rates["head"])
        return layer_part / (r_layer * 1e9) + heads / (r_head * 1e9)

    cpu_note = " (CPU time of this process, all threads)" if device.type == "cpu" else ""
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print(f"(a) plain HF forward, labels=, per mask : {t_plain:8.1f} s wall ({len(masks) / t_plain:.2f} masks/s), "
          f"{c_plain:8.1f} s CPU")
    print(f"(b) layershap oracle -> zarr store      : {t_fast:8.1f} s wall ({len(masks) / t_fast:.2f} masks/s), "
          f"{c_fast:8.1f} s CPU")
    print(f"ratio oracle / plain                     : {t_fast / t_plain:8.3f} wall, {c_fast / max(c_plain, 1e-9):.3f} "
          f"CPU time  (target <= 0.6)")
    print(f"max |nll_oracle - nll_plain|             : {np.abs(fast - plain).max():.2e} nats "
          f"(nll range {fast.min():.3f} .. {fast.max():.3f})")
    print(f"prefix sharing: {stats['layer_runs']} of {stats['plain_layer_runs']} layer forwards per window batch "
          f"({share:.1%}), {stats['slots']} cache slots, peak cache {stats['peak_cache_bytes'] / 2**20:.1f} MiB")
    for name, shape in (("layer", layer_shape), ("head", head_shape)):
        (w0, c0), (w1, c1) = rates[name]
        print(f"matmul rate, {name} shape [{shape[0]}x{shape[1]}]@[{shape[1]}x{shape[2]}] {dtype}: "
              f"before/after {w0:.1f}/{w1:.1f} GFLOP/s wall, {c0:.1f}/{c1:.1f} GFLOP per CPU-s{cpu_note}")
    print(f"FLOPs: nominal {(layer_flops + heads) / 1e12:.3f} TFLOP (layers {layer_flops / 1e12:.3f}, head "
          f"{heads / 1e12:.3f}); computed after prefix sharing {computed / 1e12:.3f} TFLOP")
    print(f"oracle throughput: nominal {(layer_flops + heads) / t_fast / 1e9:.1f} GFLOP/s, computed "
          f"{computed / t_fast / 1e9:.1f} GFLOP/s; plain {(layer_flops + heads) / t_plain / 1e9:.1f} GFLOP/s "
          f"(the plain head also runs on the {n_win} last positions, not counted)")
    for kind, label, t_a, t_b in ((0, "wall", t_plain, t_fast), (1, "CPU time", c_plain, c_fast)):
        if kind == 1 and device.type != "cpu":
            continue
        print(f"roofline fraction ({label}): oracle {roofline_seconds(kind, layer_flops) / t_b:.1%} of matmul speed "
              f"for the nominal FLOPs, {roofline_seconds(kind, layer_flops * share) / t_b:.1%} for the computed "
              f"FLOPs; plain path {roofline_seconds(kind, layer_flops) / t_a:.1%}  (target >= 50 %)")
    nominal_rate = (layer_flops + heads) / t_fast
    if args.peak_tflops:
        peak = args.peak_tflops * 1e12
        print(f"fraction of the {args.peak_tflops:g} TFLOP/s datasheet peak: oracle {nominal_rate / peak:.1%} "
              f"nominal, {computed / t_fast / peak:.1%} computed; plain {(layer_flops + heads) / t_plain / peak:.1%}")
    print_cost_model(float(per_layer.mean()), float(vocab * hidden), float(masks.mean()), nominal_rate, load_s,
                     args.gpus, "GPU" if device.type == "cuda" else "CPU worker")
    if args.kl:
        kl_report(model, windows_np, masks, args, label, t_fast, device)
    return 0


def exact_kl(model, windows: np.ndarray, masks: np.ndarray, batch_size: int) -> np.ndarray:
    """Mean token KL(dense || masked) over the whole vocabulary, from plain full-logit forwards (float64)."""
    from layershap.oracle.layers import skip_layers

    ids = torch.as_tensor(windows).to(next(model.parameters()).device)

    def log_probs(mask):
        out = []
        with skip_layers(model, mask):
            for start in range(0, ids.shape[0], batch_size):
                logits = model(ids[start : start + batch_size], use_cache=False).logits[:, :-1]
                out.append(torch.log_softmax(logits.double(), dim=-1).cpu())
        return torch.cat(out)

    with torch.inference_mode():
        dense = log_probs(np.ones(masks.shape[1], bool))
        return np.array([float((dense.exp() * (dense - log_probs(m))).sum(-1).mean()) for m in masks])


def kl_report(model, windows_np: np.ndarray, masks: np.ndarray, args, label: str, t_nll: float, device) -> None:
    """Time the KL oracle on the same masks and windows, and compare its top-k KL with the exact KL."""
    from scipy.stats import spearmanr

    from layershap.oracle.evaluate import MaskedEvaluator
    from layershap.oracle.measure import measure_masks
    from layershap.oracle.store import DatasetStore

    evaluator = MaskedEvaluator(model, windows_np, batch_size=args.batch_size, cache_mb=args.cache_mb,
                                utility="kl", top_k=args.top_k)
    sync(device)
    start = time.perf_counter()
    evaluator.reference()
    sync(device)
    t_ref = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        ident = {**identity(model, windows_np, label), "utility": "kl"}
        store = DatasetStore.create_or_open(Path(tmp) / "kl.zarr", ident, windows_np)
        start = time.perf_counter()
        measure_masks(evaluator, store, masks)
        sync(device)
        t_kl = time.perf_counter() - start
        kl = {row.tobytes(): v for row, v in zip(store.masks, store.loss)}
    print(f"(c) layershap oracle, utility kl (top {args.top_k}): {t_kl:8.1f} s wall "
          f"({len(masks) / t_kl:.2f} masks/s) + {t_ref:.1f} s once for the dense reference")
    print(f"ratio kl / nll oracle                    : {t_kl / t_nll:8.3f} wall (target <= 1.2); with the reference "
          f"pass {(t_kl + t_ref) / t_nll:.3f}")
    check = masks[(~masks).sum(axis=1) > 0][: args.exact_masks]
    exact = exact_kl(model, windows_np, check, args.batch_size)
    approx = np.array([kl[row.tobytes()] for row in check])
    rel = np.abs(approx - exact) / np.maximum(exact, 1e-12)
    print(f"top-{args.top_k} KL vs exact KL on {len(check)} masks: relative gap median {np.median(rel):.2%}, max "
          f"{rel.max():.2%} (a lower bound by construction: top-k <= exact everywhere: {bool((approx <= exact + 1e-6).all())}); "
          f"Spearman {spearmanr(approx, exact).statistic:.4f}; exact KL range {exact.min():.4f} .. {exact.max():.4f}")


if __name__ == "__main__":
    raise SystemExit(main())
