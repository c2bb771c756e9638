"""What identifying a model directory costs: the content hash of every weight (``model_fingerprint``) against the
load itself and against a sampled fingerprint (4,096 values per tensor at a fixed stride, layershap 0.1.0's),
on the embedded Gemma-3-270M and on a larger random Llama-shaped model; prints seconds, GB/s and the ratios.

Example:
    $ nice -n 10 .venv/bin/python benchmarks/fingerprint_cost.py --hidden 2048 --layers 16 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import hashlib
import time

import torch

from layershap.oracle.fingerprint import HASH_THREADS, model_fingerprint
from layershap.oracle.loading import load_model


def sampled_fingerprint(model: torch.nn.Module, samples: int = 4096) -> str:
    """The cheap alternative: name, shape, dtype and ``samples`` values per tensor at a fixed stride."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            picked = flat[:: max(1, flat.numel() // samples)][:samples].to("cpu", torch.float32).contiguous()
            digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|".encode() + picked.numpy().tobytes())
    return digest.hexdigest()


def timed(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def report(label: str, model: torch.nn.Module, load_seconds: float | None) -> None:
    gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    full = min(timed(model_fingerprint, model) for _ in range(2))
    sampled = min(timed(sampled_fingerprint, model) for _ in range(2))
    line = (f"{label}: {gb:.2f} GB of weights; content hash {full:.2f} s ({gb / full:.2f} GB/s on {HASH_THREADS} "
            f"threads), sampled fingerprint {sampled:.2f} s, ratio {full / sampled:.1f}x")
    if load_seconds is not None:
        line += f"; load {load_seconds:.1f} s, hash / load = {full / load_seconds:.2f}"
    print(line, flush=True)
    print(f"  at this rate a 70B model in bfloat16 (140 GB) hashes in {140 / (gb / full):.0f} s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--hidden", type=int, default=2048, help="width of the random Llama-shaped model")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()

    started = time.perf_counter()
    loaded = load_model(args.model, device="cpu")  # includes the content hash
    load_seconds = time.perf_counter() - started
    report(args.model, loaded.model, load_seconds)
    del loaded

    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75), num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256),
                         vocab_size=32000)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    n = sum(p.numel() for p in model.parameters())
    report(f"random Llama ({n / 1e9:.2f} B parameters, {args.dtype})", model, None)


if __name__ == "__main__":
    main()
