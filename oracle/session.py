"""Open an oracle session: check the request against any existing store cheaply, then load the model, cut the
calibration windows, open (or create) the dataset store and build the masked evaluator.

Nothing is written when the store belongs to another model, text or layer count.

Example:
    >>> with open_session(model="gemma-3-270m", text="builtin", masks="loo", out=Path("runs/g.zarr")) as s:  # doctest: +SKIP
    ...     measure_masks(s.evaluator, s.store, s.masks)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch

from layershap.core.defaults import CALIBRATION_SEQ_LEN, CALIBRATION_WINDOWS
from layershap.core.errors import LayershapError
from layershap.core.load_options import DEFAULT_LOADING, LoadOptions
from layershap.core.masks import unique_rows
from layershap.sampling.specs import check_mask_spec, parse_mask_spec

from .evaluate import MaskedEvaluator
from .loading import LoadedModel, load_model
from .measure import CachedOracle, dataset_identity
from .store import DatasetStore
from .sublayers import check_players, sublayer_spec
from .task_utility import TaskSplit, check_task_file, open_task, parse_utility
from .text import CalibrationText, load_text, make_windows, tokenize_stream
from .windows import blocks_that_fit, decision_windows, validation_windows
from .writer_lock import WriterLock


@dataclass
class OracleSession:
    """A loaded model, its dataset store and evaluator, and the masks a command asked for (``task``: the split
    multiple-choice task of a ``task:FILE`` utility, else None; ``heal`` and ``wrap``: the healing a heal-aware
    session measures after, and what makes a decision block's evaluator measure the same way)."""

    loaded: LoadedModel
    store: DatasetStore
    evaluator: MaskedEvaluator
    masks: np.ndarray
    task: TaskSplit | None = None
    heal: str = "none"  # the healing every mask is measured after (heal-aware plans), else none
    wrap: Callable[[MaskedEvaluator], Any] | None = None  # turns a block's evaluator into the session's kind

    def close(self) -> None:
        """Give back the store's write lock (the rows stay readable); a ``with`` block calls it."""
        self.store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_new(out: Path) -> bool:
    return not out.exists() or (out.is_dir() and not any(out.iterdir()))


def _check_request(masks: str, n_masks: int | None, text: str, out: Path, windows: int, seq_len: int,
                   seed: int, loading: LoadOptions, utility: str = "nll",
                   players: str = "blocks") -> tuple[CalibrationText | None, DatasetStore | None]:
    """Cheap checks before any model is loaded: the mask spec, and an existing store at ``out`` must be a
    layershap store made from the same text with the same window count and length (and ``--dtype``, when one is
    given) that the masks fit, with no other process writing it. Returns the text (None for a task utility,
    whose questions replace it) and the existing store (``None`` for a new one)."""
    check_mask_spec(masks)
    check_players(players)
    kind, task_file = parse_utility(utility)
    if kind == "task":
        check_task_file(task_file)
    if n_masks is not None and not masks.strip().startswith("stratified"):
        raise LayershapError(f"--n-masks applies to the stratified mask specs only, not to {masks!r}")
    calibration = None if kind == "task" else load_text(text)
    if _is_new(out):
        return calibration, None
    existing = DatasetStore.open(out)
    parse_mask_spec(masks, existing.n_layers, n_masks, seed)
    text_keys = {} if calibration is None else {"text_id": calibration.text_id, "n_windows": windows,
                                                "seq_len": seq_len}
    existing.check_identity({**text_keys, "utility": kind, "game": players,
                             **({"dtype": loading.dtype} if loading.dtype else {})})
    WriterLock.check_free(out)  # another run writing it: refused before the model is loaded
    print(f"extending {out}: {len(existing)} rows stored")
    return calibration, existing


def open_session(
    *,
    model: str,
    text: str,
    masks: str,
    out: str | Path,
    n_masks: int | None = None,
    windows: int = CALIBRATION_WINDOWS,
    seq_len: int = CALIBRATION_SEQ_LEN,
    seed: int = 0,
    loading: LoadOptions = DEFAULT_LOADING,
    batch_size: int = 4,
    cache_mb: int | None = None,
    utility: str = "nll",
    players: str = "blocks",
) -> OracleSession:
    """Check the request and any existing store cheaply, then load the model and open (or create) the store.

    ``masks`` is a mask spec (``loo``, ``stratified``, ``stratified-all``, ``file:PATH``); ``n_masks`` applies to
    the stratified specs only; ``loading``: device, dtype and device map of the model (``device_map="auto"``
    shards it over the GPUs); ``utility``: what a row measures (``nll``, ``kl`` to the dense model, or
    ``task:FILE``: the NLL of a multiple-choice task's gold answers, its questions replacing the text's windows:
    :mod:`.task_utility`);
    ``players``: ``blocks`` (a mask entry per decoder layer) or ``sublayers`` (attention and MLP apart). Prints
    one line about the store and the masks still to measure. The session holds the store's write lock: close it
    (or use it in a ``with`` block).

    Example:
        >>> with open_session(model="./tiny", text="builtin", masks="stratified", n_masks=64, out="x.zarr") as s:  # doctest: +SKIP
        ...     measure_masks(s.evaluator, s.store, s.masks)
    """
    if loading.device == "cuda" and not torch.cuda.is_available():
        raise LayershapError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    out = Path(out)
    calibration, _ = _check_request(masks, n_masks, text, out, windows, seq_len, seed, loading, utility, players)
    kind, task_file = parse_utility(utility)
    loaded = load_model(model, **loading.as_kwargs())
    if players == "sublayers":
        sublayer_spec(loaded.model)  # an unsupported family is refused before any store is made
    task, weights = None, None
    if calibration is None:
        task = open_task(task_file, loaded.tokenizer, seed)
        token_windows, weights = task.calibration.ids, task.calibration.weights
        text_id, seq_len = task.text_id, token_windows.shape[1] - 1
    else:
        token_windows = make_windows(loaded.tokenizer, calibration.text, windows, seq_len, seed)
        text_id = calibration.text_id
    identity = dataset_identity(loaded, text_id, token_windows, seq_len, game=players, utility=kind,
                                task=None if task is None else task.identity())
    wanted = unique_rows(parse_mask_spec(masks, identity["n_layers"], n_masks, seed))
    store = DatasetStore.create_or_open(out, identity, token_windows)  # identity mismatch -> error, nothing written
    todo = int(store.missing(wanted).sum())
    what = (f"{identity['n_layers'] // 2} layers ({identity['n_layers']} attention/MLP players)"
            if players == "sublayers" else f"{identity['n_layers']} layers")
    shape = (f"{token_windows.shape[0]} x {token_windows.shape[1]} tokens" if task is None else
             f"{token_windows.shape[0]} questions of task {task.task.name} (padded to {token_windows.shape[1]} "
             f"tokens; {len(task.decision)} more decide the plans)")
    print(
        f"{loaded.model_id}: {what}, {identity['dtype']} on {loaded.device}; "
        f"{shape}; {len(wanted)} masks asked for, {len(wanted) - todo} already stored, {todo} to measure"
    )
    evaluator = MaskedEvaluator(loaded.model, token_windows, batch_size=batch_size, device=loaded.device,
                                cache_mb=cache_mb, utility=kind, players=players, weights=weights)
    return OracleSession(loaded, store, evaluator, wanted, task)


def open_validation(session: OracleSession, *, text: str, out: str | Path, windows: int, seq_len: int, seed: int,
                    batch_size: int = 4, cache_mb: int | None = None, progress: bool = True) -> CachedOracle:
    """An oracle on validation windows of the session's text, disjoint from its calibration windows
    (:func:`~layershap.oracle.windows.validation_windows`), backed by its own store at ``out`` (resumable).

    Example:
        >>> val = open_validation(session, text="builtin", out="runs/x/validation.zarr", windows=4, seq_len=128, seed=0)  # doctest: +SKIP
        >>> val.loss(masks)  # doctest: +SKIP
    """
    calibration = load_text(text)
    token_windows = validation_windows(session.loaded.tokenizer, calibration.text, windows, seq_len, seed)
    return _block_oracle(session, calibration.text_id, Path(out), token_windows, seq_len, batch_size, cache_mb,
                         progress, "validation windows")


def open_decision_blocks(session: OracleSession, *, text: str, out: str | Path, windows: int, seq_len: int,
                         seed: int, block_windows: int, block_seq_len: int, n_blocks: int, batch_size: int = 4,
                         cache_mb: int | None = None, progress: bool = True) -> list[CachedOracle]:
    """Oracles on ``n_blocks`` blocks of decision windows of the session's text (each block ``block_windows`` x
    ``block_seq_len`` tokens, disjoint from the calibration windows — ``windows`` x ``seq_len``, ``seed`` — and
    from each other: :func:`~layershap.oracle.windows.decision_windows`), each backed by its own store
    ``out/decision-<b>.zarr`` (resumable), measuring the session's utility. Fewer blocks come back when the text
    holds fewer (a line says so).

    Example:
        >>> blocks = open_decision_blocks(session, text="builtin", out="runs/x", windows=2, seq_len=256, seed=0,  # doctest: +SKIP
        ...                               block_windows=4, block_seq_len=256, n_blocks=3)
        >>> [b.window_loss(masks) for b in blocks]  # doctest: +SKIP
    """
    loaded = session.loaded
    if session.task is not None:  # the task utility: blocks of the questions the calibration set left out
        return [_block_oracle(session, session.task.text_id, Path(out) / f"decision-{b}.zarr", w.ids,
                              w.ids.shape[1] - 1, batch_size, cache_mb, progress, f"decision block {b}", w.weights)
                for b, w in enumerate(session.task.decision_blocks(n_blocks))]
    calibration = load_text(text)
    stream = tokenize_stream(loaded.tokenizer, calibration.text)
    fit = blocks_that_fit(stream.size, windows, seq_len, block_windows, block_seq_len)
    if fit < n_blocks:
        print(f"the text holds {fit} of the {n_blocks} decision blocks of {block_windows} x {block_seq_len} tokens "
              f"asked for; deciding on {fit}")
    if fit == 0:
        raise LayershapError(f"the text ({stream.size} tokens) has no room for a decision block of {block_windows} "
                             f"x {block_seq_len} tokens beside the calibration windows; use a longer text, or "
                             "shorter or fewer windows")
    blocks = decision_windows(loaded.tokenizer, calibration.text, windows, seq_len, seed, block_windows,
                              block_seq_len, min(fit, n_blocks))
    return [_block_oracle(session, calibration.text_id, Path(out) / f"decision-{b}.zarr", w, block_seq_len,
                          batch_size, cache_mb, progress, f"decision block {b}") for b, w in enumerate(blocks)]


def _block_oracle(session: OracleSession, text_id: str, path: Path, token_windows: np.ndarray, seq_len: int,
                  batch_size: int, cache_mb: int | None, progress: bool, label: str,
                  weights: np.ndarray | None = None) -> CachedOracle:
    loaded = session.loaded
    utility, players = session.evaluator.utility, session.evaluator.players
    identity = dataset_identity(loaded, text_id, token_windows, seq_len, game=players, utility=utility,
                                task=None if session.task is None else session.task.identity(), heal=session.heal)
    store = DatasetStore.create_or_open(path, identity, token_windows)
    evaluator = MaskedEvaluator(loaded.model, token_windows, batch_size=batch_size, device=loaded.device,
                                cache_mb=cache_mb, utility=utility, top_k=session.evaluator.top_k, players=players,
                                weights=weights)
    if session.wrap is not None:
        evaluator = session.wrap(evaluator)
    return CachedOracle(evaluator, store, label=label, progress=progress)


def measure_on_workers(*, model: str, text: str, masks: str, out: str | Path, workers: int,
                       ray_address: str | None = None, n_masks: int | None = None,
                       windows: int = CALIBRATION_WINDOWS, seq_len: int = CALIBRATION_SEQ_LEN, seed: int = 0,
                       loading: LoadOptions = DEFAULT_LOADING, batch_size: int = 4,
                       cache_mb: int | None = None, masks_per_call: int = 32,
                       progress: bool = True) -> DatasetStore:
    """:func:`open_session` + ``measure_masks`` on ``workers`` Ray workers (``layershap[ray]``): the workers load
    the model (never this process), cut the windows, and measure; this process alone writes the store, so a
    killed run resumes exactly as the single-process one does. Returns the store (closed: readable, its write
    lock given back).

    Example:
        >>> store = measure_on_workers(model="./my-llama", text="calib.txt", masks="stratified", out="l.zarr", workers=8)  # doctest: +SKIP
    """
    from .distributed import RayOracle, connect
    from .measure import measure_masks

    out = Path(out)
    calibration, existing = _check_request(masks, n_masks, text, out, windows, seq_len, seed, loading)
    dtype = loading.dtype or (None if existing is None else existing.identity["dtype"])
    connect(ray_address)
    with RayOracle(model, workers=workers, dtype=dtype, device=loading.device, device_map=loading.device_map,
                   batch_size=batch_size, cache_mb=cache_mb) as pool:
        token_windows, identity = pool.windows_for(calibration.text, calibration.text_id, windows, seq_len, seed)
        with DatasetStore.create_or_open(out, identity, token_windows) as store:
            wanted = unique_rows(parse_mask_spec(masks, identity["n_layers"], n_masks, seed))
            print(f"{identity['model_id']}: {identity['n_layers']} layers on {workers} Ray workers; {len(wanted)} "
                  f"masks asked for, {int(store.missing(wanted).sum())} to measure")
            measure_masks(pool, store, wanted, progress=progress, masks_per_call=masks_per_call)
    return store
