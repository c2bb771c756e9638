"""``layershap oracle``: measure the log-perplexity of layer masks of a real model into a zarr dataset store.

Running the same command again resumes: masks already in the store are skipped, finished rows are kept.

Example:
    $ layershap oracle --model gemma-3-270m --text builtin --masks loo --out runs/g270m.zarr
    $ layershap oracle --model ./my-llama --masks stratified --n-masks 256 --out runs/llama.zarr --seq-len 256
    $ layershap oracle --model ./my-llama --masks stratified --n-masks 8000 --out llama.zarr --workers 8
    $ layershap oracle --model ./my-llama --players sublayers --masks stratified --out llama-sub.zarr
    $ layershap oracle --masks loo --utility task:benchmarks/tasks/pydoc_mc.yaml --out runs/pydoc.zarr
"""

from __future__ import annotations

from typing import Literal

from layershap.core.defaults import CALIBRATION_SEQ_LEN, CALIBRATION_WINDOWS
from layershap.core.errors import LayershapError
from layershap.core.load_options import DEFAULT_LOADING, LoadOptions

from .options import non_negative, positive


def oracle(
    model: str,
    masks: str,
    out: str,
    text: str = "builtin",
    n_masks: int | None = None,
    windows: int = CALIBRATION_WINDOWS,
    seq_len: int = CALIBRATION_SEQ_LEN,
    seed: int = 0,
    loading: LoadOptions = DEFAULT_LOADING,
    batch_size: int = 4,
    masks_per_call: int = 8,
    cache_mb: int | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
    progress: bool = True,
    players: Literal["blocks", "sublayers"] = "blocks",
    utility: str = "nll",
) -> int:
    """Measure log-perplexity of layer masks into a zarr store (created, or extended/resumed when it exists).

    Args:
        model: gemma-3-270m (embedded default), a .gguf file, a local model directory or a hub id.
        masks: mask spec: loo | stratified | stratified-all | file:PATH (.npy or a text file of 0/1 rows).
        out: dataset store (STORE.zarr) to create, or to extend/resume when it exists.
        text: calibration text: builtin, a .txt/.jsonl path, wikitext2 or c4.
        n_masks: number of stratified masks, full model and leave-one-out included (stratified specs; default 128).
        windows: token windows per mask.
        seq_len: tokens per window.
        seed: seed of the window positions and of sampled masks.
        loading: how to load the model (--device, --dtype, --device-map; the same for every command).
        batch_size: windows per forward pass.
        masks_per_call: masks evaluated (and committed) together; shared kept-layer prefixes are computed once
            per group; a kill loses at most one group.
        cache_mb: memory budget (MiB) for cached hidden states of shared layer prefixes (default 512 on CPU,
            2048 on CUDA).
        workers: measure on this many Ray workers (pip install 'layershap[ray]'): one GPU each, or one CPU core
            each without GPUs; each loads the model once; this process alone writes the store.
        ray_address: Ray cluster to join (default: $RAY_ADDRESS, else a new local cluster); needs --workers.
            With --device-map each worker shards its model over its GPUs.
        progress: show the progress bar.
        players: blocks = a mask entry per decoder layer; sublayers = two per layer (entry 2i: layer i's
            attention, 2i+1: its MLP), each skipped on its own (Llama, Mistral, Qwen 2/3, Gemma 2/3).
        utility: what a row measures: nll (token NLL of the text), kl (KL to the dense model's next-token
            distributions) or task:FILE (the NLL of a local multiple-choice task's correct answers; FILE: its
            lm-eval YAML; its questions replace --text, --windows and --seq-len).
    """
    import time
    from pathlib import Path

    from layershap.oracle.describe import perplexity_text
    from layershap.oracle.measure import measure_masks
    from layershap.oracle.session import measure_on_workers, open_session
    from layershap.oracle.store import DatasetStore
    from layershap.oracle.task_utility import parse_utility

    for name, value in (("n_masks", n_masks), ("windows", windows), ("seq_len", seq_len),
                        ("batch_size", batch_size), ("masks_per_call", masks_per_call), ("cache_mb", cache_mb)):
        positive(name, value)
    non_negative("seed", seed)
    positive("workers", workers)
    if ray_address is not None and workers is None:
        raise LayershapError("--ray-address needs --workers N (the number of Ray workers to start there)")
    if workers is not None and players != "blocks":
        raise LayershapError("--workers measures the blocks game only; drop --workers for --players sublayers")
    if workers is not None and parse_utility(utility)[0] != "nll":
        raise LayershapError(f"--workers measures the nll utility only; drop --workers for --utility {utility}")
    parse_utility(utility)
    started = time.perf_counter()
    if workers is not None:
        before = len(DatasetStore.open(out)) if Path(out).exists() else 0
        store = measure_on_workers(model=model, text=text, masks=masks, out=out, workers=workers,
                                   ray_address=ray_address, n_masks=n_masks, windows=windows, seq_len=seq_len,
                                   seed=seed, loading=loading, batch_size=batch_size, cache_mb=cache_mb,
                                   masks_per_call=masks_per_call, progress=progress)
        added = len(store) - before
    else:
        with open_session(model=model, text=text, masks=masks, out=out, n_masks=n_masks, windows=windows,
                          seq_len=seq_len, seed=seed, loading=loading, batch_size=batch_size,
                          cache_mb=cache_mb, players=players, utility=utility) as session:
            store = session.store
            added = measure_masks(session.evaluator, store, session.masks, progress=progress,
                                  masks_per_call=masks_per_call)
    print(f"added {added} rows; {len(store)} rows in {out} ({time.perf_counter() - started:.1f} s)")
    full = store.masks.all(axis=1)
    if full.any() and store.utility != "nll":
        print(f"full model: {store.utility} {float(store.loss[full][0]):.4f} nats"
              f"{' per question' if store.utility == 'task' else '/token'}")
    elif full.any():
        nll = float(store.nll[full][0])
        print(f"full model: nll {nll:.4f} nats/token, perplexity {perplexity_text(nll)}")
    return 0
