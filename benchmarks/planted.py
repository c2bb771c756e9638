"""Deep models with planted structure, for developing against models layershap was not tuned on.

A planted model is a small Mistral-shaped causal LM (random weights, ``--layers`` deep, sliding-window attention over
the last 32 tokens, so that its text is a stationary process and a window cut anywhere from it is a fair sample)
whose layers were given known roles by weight surgery on their output projections (``o_proj`` and ``down_proj``,
which scale a layer's update to the residual stream):

- **ordinary** layers: updates of random size (scale 0.6-1.4);
- **cheap** layers: small updates (scale 0.12-0.2), the obvious removals;
- **cornerstones**: large updates (scale 3), whose removal is catastrophic;
- a **redundant pair**: two copies of one layer at half scale each (removing one costs about a quarter of removing
  both: together they are worth more than apart);
- a **cancelling pair**: a layer followed by its copy with negated output projections (together nearly the
  identity, so removing both is nearly free while removing either alone is costly: no leave-one-out or greedy
  path finds it);
- an **interacting triple**: three copies of one layer at a third of the scale each.

Its text is sampled from the dense model itself, as long continuous streams (temperature 1; a word-level tokenizer
maps token ``i`` to the word ``t<i>``), so the dense model is the text's true distribution; held-out texts are
samples of other seeds, at temperature 1 (same domain) and 0.8 (a shifted domain). ``build(folder, layers, seed)`` writes ``model/`` (a
standard Hugging Face folder that ``layershap run --model`` loads), ``calib.txt``, ``heldout-same.txt``,
``heldout-shift.txt`` and ``roles.json``.

Example:
    $ python benchmarks/planted.py --out /tmp/planted32 --layers 32
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

VOCAB = 512
HIDDEN = 64
WINDOW = 32  # sliding attention window of every layer
STREAM = 2048  # tokens per sampled stream
UPDATE = 0.5  # overall scale of the layers' updates (an ordinary layer's leave-one-out KL: ~0.05-0.3 nats)


def roles(n_layers: int, seed: int) -> dict:
    """Which layers play which role (disjoint, spread over the depth; layer 0 stays ordinary)."""
    rng = np.random.default_rng(seed)
    free = list(rng.permutation(np.arange(2, n_layers - 1)))

    def take(k: int) -> list[int]:
        return sorted(int(free.pop()) for _ in range(k))

    cancel = None
    for i in list(free):  # the cancelling pair needs two neighbours
        if i + 1 in free:
            free.remove(i)
            free.remove(i + 1)
            cancel = [int(i), int(i + 1)]
            break
    return {"cornerstones": take(2), "cheap": take(max(4, n_layers // 6)), "redundant_pair": take(2),
            "cancelling_pair": cancel, "triple": take(3)}


def planted_model(n_layers: int, seed: int):
    """The planted model (float32, eval mode) and its roles."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                           num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=STREAM + 8, sliding_window=WINDOW, bos_token_id=0, eos_token_id=1,
                           tie_word_embeddings=False)
    model = MistralForCausalLM(config).eval()
    r = roles(n_layers, seed)
    rng = np.random.default_rng(seed + 1)
    layers = model.model.layers
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.08)
        scale = rng.uniform(0.6, 1.4, n_layers)
        scale[r["cheap"]] = rng.uniform(0.12, 0.2, len(r["cheap"]))
        scale[r["cornerstones"]] = 3.0
        a, b = r["redundant_pair"]
        layers[b].load_state_dict(layers[a].state_dict())
        scale[[a, b]] = 0.5 * 1.6
        t0, t1, t2 = r["triple"]
        for t in (t1, t2):
            layers[t].load_state_dict(layers[t0].state_dict())
        scale[[t0, t1, t2]] = 1.6 / 3
        if r["cancelling_pair"] is not None:
            c0, c1 = r["cancelling_pair"]
            layers[c1].load_state_dict(layers[c0].state_dict())
            scale[[c0, c1]] = 1.0
        for i, layer in enumerate(layers):
            layer.self_attn.o_proj.weight.mul_(UPDATE * float(scale[i]))
            layer.mlp.down_proj.weight.mul_(UPDATE * float(scale[i]))
        if r["cancelling_pair"] is not None:
            c1 = r["cancelling_pair"][1]
            layers[c1].self_attn.o_proj.weight.neg_()
            layers[c1].mlp.down_proj.weight.neg_()
        model.lm_head.weight.mul_(3.0)  # peaked next-token distributions: a text with structure to lose
    return model, r, scale


def sample_text(model, streams: int, temperature: float, seed: int) -> str:
    """``streams`` continuous streams of :data:`STREAM` tokens sampled from ``model`` (ancestral sampling with its
    KV cache), as words ``t<id>``, one line each."""
    torch.manual_seed(seed)
    with torch.no_grad():
        ids = torch.zeros((streams, 1), dtype=torch.long)  # BOS
        out = model.generate(ids, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                             max_new_tokens=STREAM, min_new_tokens=STREAM, pad_token_id=1, eos_token_id=None)
    return "\n".join(" ".join(f"t{int(t)}" for t in row[1:]) for row in out) + "\n"


def word_tokenizer():
    """Token ``i`` <-> word ``t<i>`` (``<s>`` = 0 is BOS), whitespace-separated: a lossless tokenizer for the
    sampled texts."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, **{f"t{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="</s>",
                                   pad_token="</s>")


def build(folder: Path, n_layers: int, seed: int = 0, calib_streams: int = 16, heldout_streams: int = 2) -> Path:
    """Write the planted model, its texts and roles into ``folder`` (reused when already there)."""
    folder = Path(folder)
    if (folder / "roles.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    model, r, scale = planted_model(n_layers, seed)
    tok = word_tokenizer()
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    (folder / "calib.txt").write_text(sample_text(model, calib_streams, 1.0, seed + 10))
    (folder / "heldout-same.txt").write_text(sample_text(model, heldout_streams, 1.0, seed + 20))
    (folder / "heldout-shift.txt").write_text(sample_text(model, heldout_streams, 0.8, seed + 30))
    (folder / "roles.json").write_text(json.dumps({"layers": n_layers, "seed": seed, **r,
                                                   "scale": [round(float(s), 3) for s in scale]}, indent=2) + "\n")
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    folder = build(args.out, args.layers, args.seed)
    print(f"wrote {folder}: {json.loads((folder / 'roles.json').read_text())}")


if __name__ == "__main__":
    main()
