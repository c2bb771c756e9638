"""``layershap oracle``: measure the log-perplexity of layer masks of a real model into a zarr dataset store.

Running the same command again resumes: masks already in the store are skipped, finished rows are kept.

Example:
    $ layershap oracle --model gemma-3-270m --text builtin --masks loo --out runs/g270m.zarr
    $ layershap oracle --model ./my-llama --masks file:masks.txt --out runs/llama.zarr --windows 8 --seq-len 256
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from layershap.oracle.evaluate import MaskedEvaluator
    from layershap.oracle.loading import LoadedModel
    from layershap.oracle.store import DatasetStore


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="gemma-3-270m (embedded default), a .gguf file, a local model directory or a hub id")
    parser.add_argument("--text", default="builtin",
                        help="calibration text: builtin, a .txt/.jsonl path, wikitext2 or c4 (default: builtin)")
    parser.add_argument("--masks", required=True, metavar="SPEC",
                        help="loo | stratified | stratified-all | file:PATH (.npy or text file of 0/1 rows)")
    parser.add_argument("--out", required=True, metavar="STORE.zarr",
                        help="dataset store to create, or to extend/resume when it exists")
    parser.add_argument("--n-masks", type=positive_int, default=None,
                        help="number of masks for the stratified specs (default 128)")
    parser.add_argument("--windows", type=positive_int, default=4, help="token windows per mask (default 4)")
    parser.add_argument("--seq-len", type=positive_int, default=128, help="tokens per window (default 128)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the window positions and of sampled masks (default 0)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto = CUDA when available, else CPU (default auto)")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward pass (default 4)")
    parser.add_argument("--masks-per-call", type=positive_int, default=8,
                        help="masks evaluated (and committed) together; shared kept-layer prefixes are computed "
                             "once per group; a kill loses at most one group (default 8)")
    parser.add_argument("--cache-mb", type=positive_int, default=None,
                        help="memory budget for cached hidden states of shared layer prefixes "
                             "(default 512 on CPU, 2048 on CUDA)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


@dataclass
class OracleSession:
    """A loaded model, its dataset store and evaluator, and the masks a command asked for."""

    loaded: LoadedModel
    store: DatasetStore
    evaluator: MaskedEvaluator
    masks: np.ndarray


def open_session(args: argparse.Namespace) -> OracleSession:
    """Check arguments and any existing store cheaply, then load the model and open (or create) the store.

    Nothing is written when the store belongs to another model, text or layer count.
    """
    import torch

    from layershap.oracle.errors import LayershapError
    from layershap.oracle.evaluate import MaskedEvaluator
    from layershap.oracle.loading import load_model
    from layershap.oracle.measure import dataset_identity, unique_rows
    from layershap.oracle.store import DatasetStore
    from layershap.oracle.text import load_text, make_windows
    from layershap.sampling.specs import check_mask_spec, parse_mask_spec

    check_mask_spec(args.masks)
    if args.n_masks is not None and not args.masks.strip().startswith("stratified"):
        raise LayershapError(f"--n-masks applies to the stratified mask specs only, not to {args.masks!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise LayershapError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    out = Path(args.out)

    # Cheap checks against an existing store before loading the model: it must be a layershap store,
    # made from the same text with the same window count and length, and the masks must fit it.
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        existing = DatasetStore.open(out)
        parse_mask_spec(args.masks, existing.n_layers, args.n_masks, args.seed)
        text = load_text(args.text)
        existing.check_identity({"text_id": text.text_id, "n_windows": args.windows, "seq_len": args.seq_len})
        print(f"extending {out}: {len(existing)} rows stored")
    else:
        text = load_text(args.text)

    loaded = load_model(args.model, device=args.device)
    windows = make_windows(loaded.tokenizer, text.text, args.windows, args.seq_len, args.seed)
    identity = dataset_identity(loaded, text.text_id, windows, args.seq_len)
    masks = unique_rows(parse_mask_spec(args.masks, identity["n_layers"], args.n_masks, args.seed))
    store = DatasetStore.create_or_open(out, identity, windows)  # identity mismatch -> error, nothing written
    todo = int(store.missing(masks).sum())
    print(
        f"{loaded.model_id}: {identity['n_layers']} layers, {identity['dtype']} on {loaded.device}; "
        f"{windows.shape[0]} x {windows.shape[1]} tokens; {len(masks)} masks asked for, "
        f"{len(masks) - todo} already stored, {todo} to measure"
    )
    evaluator = MaskedEvaluator(loaded.model, windows, batch_size=args.batch_size, device=loaded.device,
                                cache_mb=args.cache_mb)
    return OracleSession(loaded, store, evaluator, masks)


def run(args: argparse.Namespace) -> int:
    from layershap.oracle.cli_info import perplexity_text
    from layershap.oracle.measure import measure_masks

    started = time.perf_counter()
    session = open_session(args)
    store = session.store
    added = measure_masks(session.evaluator, store, session.masks, progress=not args.no_progress,
                          masks_per_call=args.masks_per_call)

    print(f"added {added} rows; {len(store)} rows in {args.out} ({time.perf_counter() - started:.1f} s)")
    full = store.masks.all(axis=1)
    if full.any():
        nll = float(store.nll[full][0])
        print(f"full model: nll {nll:.4f} nats/token, perplexity {perplexity_text(nll)}")
    return 0
