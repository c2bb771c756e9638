"""Peak host memory of loading a model: layershap's load (weights read straight onto ``--device``) against the
load it replaced (``from_pretrained`` onto the CPU, then ``.to(device)``), each in a fresh process; prints the
peak resident set (ru_maxrss) beside the weights' size. On CPU both must hold one copy; on a GPU the direct
load should hold a few tensors, not the model.

Example:
    $ nice -n 10 .venv/bin/python benchmarks/load_memory.py --model gemma-3-270m --device cpu
    $ .venv/bin/python benchmarks/load_memory.py --model ./llama-8b --device cuda
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, resource, sys, time
import torch
from layershap.oracle import loading
spec, device, mode = sys.argv[1], sys.argv[2], sys.argv[3]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
if mode == "layershap":
    model = loading.load_model(spec, device=device).model
else:  # the former path: everything on the CPU first, then moved
    dev = loading.resolve_device(device)
    folder = loading.converted_gguf_dir(*loading.default_gguf()) if spec == loading.DEFAULT_ALIAS else spec
    model, _ = loading._load_converted(folder, loading.default_dtype(dev), {})
    model = model.to(dev)
seconds = time.perf_counter() - started
weights = sum(p.numel() * p.element_size() for p in model.parameters())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"weights_gb": weights / 1e9, "peak_gb": peak / 1e6, "before_gb": base / 1e6, "seconds": seconds}))
"""


def measure(spec: str, device: str, mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, spec, device, mode], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m", help="the alias or a model directory")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    rows = {mode: measure(args.model, args.device, mode) for mode in ("layershap", "cpu-then-move")}
    for mode, r in rows.items():
        print(f"{mode:14s} weights {r['weights_gb']:.2f} GB, peak host RSS {r['peak_gb']:.2f} GB "
              f"(imports {r['before_gb']:.2f} GB; load adds {r['peak_gb'] - r['before_gb']:.2f} GB = "
              f"{(r['peak_gb'] - r['before_gb']) / r['weights_gb']:.2f} x the weights), {r['seconds']:.1f} s")
    direct, old = rows["layershap"], rows["cpu-then-move"]
    print(f"added host memory, layershap / former load: "
          f"{(direct['peak_gb'] - direct['before_gb']) / (old['peak_gb'] - old['before_gb']):.2f}")


if __name__ == "__main__":
    main()
