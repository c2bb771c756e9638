"""Is the model hash the same under two transformers releases? Saves 13 tiny random models (10 architectures,
rotary scaling and sliding windows included) with the OTHER release, loads each with both, and prints whether
``model_fingerprint`` agrees; the fingerprint of layershap 0.1.0 (a hash of ``config.to_dict()`` and sampled
weights) is printed beside it for comparison.

The other release goes into a folder of its own, put first on ``PYTHONPATH`` for the child processes:

    $ pip download --no-deps -d wheels "transformers==4.56.2" "huggingface_hub<1.0"
    $ pip install --no-deps --target /tmp/tf456 wheels/*.whl
    $ .venv/bin/python benchmarks/hash_across_versions.py --other /tmp/tf456
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r'''
import hashlib, json, sys
import torch
import transformers as tf
from layershap.oracle.fingerprint import model_fingerprint

mode, root = sys.argv[1], sys.argv[2]
common = dict(vocab_size=320, num_hidden_layers=4, num_attention_heads=2, hidden_size=32, intermediate_size=64,
              num_key_value_heads=1, max_position_embeddings=256)
mixed = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(4)]
llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**common),
    "llama3-scaled": lambda: tf.LlamaConfig(**common, rope_theta=500000.0, rope_scaling=llama3),
    "mistral-sliding": lambda: tf.MistralConfig(**common, sliding_window=16),
    "qwen2": lambda: tf.Qwen2Config(**common),
    "qwen2-sliding": lambda: tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=16, max_window_layers=2),
    "qwen3": lambda: tf.Qwen3Config(**common, head_dim=16),
    "gemma2": lambda: tf.Gemma2Config(**common, head_dim=16, sliding_window=4),
    "gemma3": lambda: tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=4, layer_types=mixed),
    "gemma3-linear8": lambda: tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=4,
                                                  rope_scaling={"rope_type": "linear", "factor": 8.0}),
    "phi3": lambda: tf.Phi3Config(**common, pad_token_id=0),
    "gpt2": lambda: tf.GPT2Config(vocab_size=320, n_layer=4, n_head=2, n_embd=32, n_positions=256),
    "opt": lambda: tf.OPTConfig(vocab_size=320, num_hidden_layers=4, num_attention_heads=2, hidden_size=32,
                                ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=256),
    "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=320, num_hidden_layers=4, num_attention_heads=2,
                                         hidden_size=32, intermediate_size=64, max_position_embeddings=256),
}


def sampled_fingerprint(model):  # layershap 0.1.0's model hash
    digest = hashlib.sha256()
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version"):
        config.pop(volatile, None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            picked = flat[:: max(1, flat.numel() // 4096)][:4096].to("cpu", torch.float32).contiguous()
            digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|".encode() + picked.numpy().tobytes())
    return digest.hexdigest()


out = {"version": tf.__version__}
for name, make in CONFIGS.items():
    if mode == "save":
        torch.manual_seed(0)
        tf.AutoModelForCausalLM.from_config(make()).save_pretrained(f"{root}/{name}")
    model = tf.AutoModelForCausalLM.from_pretrained(f"{root}/{name}", dtype=torch.float32)
    out[name] = [model_fingerprint(model), sampled_fingerprint(model)]
print(json.dumps(out))
'''


def run(mode: str, root: str, pythonpath: str | None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-c", CHILD, mode, root], capture_output=True, text=True, env=env,
                          check=False)
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--other", required=True, help="folder holding another transformers (pip install --target)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as root:
        other = run("save", root, args.other)
        this = run("load", root, None)
    names = [k for k in other if k != "version"]
    print(f"saved with transformers {other['version']}, loaded with {other['version']} and {this['version']}")
    for name in names:
        print(f"  {name:16s} content hash {'same' if other[name][0] == this[name][0] else 'DIFFERENT':9s}  "
              f"0.1.0 fingerprint {'same' if other[name][1] == this[name][1] else 'different'}")
    same = sum(other[n][0] == this[n][0] for n in names)
    old = sum(other[n][1] == this[n][1] for n in names)
    print(f"content hash equal on {same} of {len(names)} models; the 0.1.0 fingerprint on {old} of {len(names)}")


if __name__ == "__main__":
    main()
