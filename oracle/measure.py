"""Measure layer masks with the real model and append each finished row to the dataset store.

:class:`CachedOracle` is the one cached value function ``-loss`` over the real model (the loss is the store's
utility: mean token NLL, or KL to the dense model): every distinct mask runs through the model once; with a store,
stored rows are answers and new rows are appended as they finish.

Example:
    >>> ev = MaskedEvaluator(loaded.model, windows, batch_size=4)  # doctest: +SKIP
    >>> store = DatasetStore.create_or_open(out, dataset_identity(loaded, text.text_id, windows, 128), windows)  # doctest: +SKIP
    >>> measure_masks(ev, store, loo_masks(ev.n_layers))      # rows added; already stored masks are skipped  # doctest: +SKIP
    >>> CachedOracle(ev, store)(masks)                        # -loss per mask, missing ones measured first  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from tqdm.auto import tqdm

from layershap.core.errors import MaskError
from layershap.core.masks import check_masks, unique_rows

from .evaluate import MaskedEvaluator
from .layers import find_layers, layer_types
from .loading import LoadedModel
from .measurement import Measurement
from .prefix import trie_order
from .store import DatasetStore
from .sublayers import check_players, player_names, player_types
from .text import windows_sha256

# Masks per evaluator call, taken in trie order: 128 stratified masks of an 18-layer model need 920 layer
# forwards in groups of 32 (909 all at once, 1694 without sharing; 1350 in request-order groups of 8),
# and a kill loses at most one group (~1 minute for Gemma-3-270M on 2 CPU cores).
MASKS_PER_CALL = 32


def dataset_identity(loaded: LoadedModel, text_id: str, windows: np.ndarray, seq_len: int, *,
                     game: str = "blocks", utility: str = "nll", task: dict | None = None,
                     heal: str = "none") -> dict:
    """The identity attributes of a store measured with ``loaded`` on ``windows`` cut from text ``text_id``
    (``game``: what a False in a mask removes, ``blocks`` or ``sublayers``; ``utility``: what a row measures;
    ``task``: the task of a ``task`` utility, :meth:`~layershap.oracle.task_utility.TaskSplit.identity`; ``heal``:
    the healing every mask is measured after, :meth:`~layershap.pruning.heal_aware.SpanFitter.identity`).

    A ``sublayers`` identity has ``n_layers`` = the mask width (two players per decoder layer), per-player
    ``layer_types`` (the layer's attention type, or ``mlp``) and the player names (``players``).

    Example:
        >>> ident = dataset_identity(loaded, "builtin", windows, seq_len=128)  # doctest: +SKIP
        >>> DatasetStore.create_or_open("x.zarr", ident, windows)  # doctest: +SKIP
    """
    model = loaded.model
    windows = np.asarray(windows)
    check_players(game)
    n_blocks = find_layers(model).n_layers
    sublayers = game == "sublayers"
    return {
        "model_id": loaded.model_id,
        "model_hash": loaded.model_hash,
        "n_layers": 2 * n_blocks if sublayers else n_blocks,
        "layer_types": player_types(model) if sublayers else layer_types(model),
        "text_id": text_id,
        "windows_sha256": windows_sha256(windows),
        "n_windows": int(windows.shape[0]),
        "seq_len": int(seq_len),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "game": game,
        "utility": utility,
        "heal": heal,
        **({"players": player_names(n_blocks)} if sublayers else {}),
        **({"task": task} if task is not None else {}),
    }


def trie_groups(masks: np.ndarray, masks_per_call: int = MASKS_PER_CALL) -> list[np.ndarray]:
    """Distinct ``masks`` in kept-layer trie order, cut into consecutive groups of ``masks_per_call``.

    The units of work of :func:`measure_in_groups` (and of the distributed oracle's workers): consecutive masks
    in trie order (:func:`~layershap.oracle.prefix.trie_order`) share long kept-layer prefixes, which each group
    computes once.

    Example:
        >>> [g.astype(int).tolist() for g in trie_groups(np.array([[0, 1], [1, 1], [0, 1]], bool), 1)]
        [[[1, 1]], [[0, 1]]]
    """
    if masks_per_call < 1:
        raise ValueError(f"masks_per_call must be >= 1, got {masks_per_call}")
    todo = unique_rows(np.asarray(masks, dtype=bool))
    todo = todo[trie_order(todo)]
    return [todo[start : start + masks_per_call] for start in range(0, len(todo), masks_per_call)]


def measure_in_groups(
    evaluator: MaskedEvaluator,
    masks: np.ndarray,
    on_group: Callable[[np.ndarray, Measurement, np.ndarray], None],
    *,
    progress: bool = True,
    desc: str = "measuring masks",
    masks_per_call: int = MASKS_PER_CALL,
) -> int:
    """Run distinct ``masks`` through ``evaluator`` in kept-layer trie order, ``masks_per_call`` at a time.

    After each group, ``on_group(group_masks, measurement, seconds)`` gets the group's rows (a
    :class:`~layershap.oracle.evaluate.Measurement`; ``seconds``: each row's share of the group's wall-clock time),
    so callers commit results as they finish. Consecutive masks in trie
    order (:func:`~layershap.oracle.prefix.trie_order`) share long kept-layer prefixes, which each group
    computes once. An evaluator with a ``run_groups(groups, on_group)`` method (a pool of workers,
    :class:`~layershap.oracle.distributed.RayOracle`) gets all groups at once and finishes them in any order.
    Returns the number of masks measured.

    Example:
        >>> measure_in_groups(evaluator, masks, lambda m, v, s: print(len(m)), progress=False)  # doctest: +SKIP
    """
    groups = trie_groups(masks, masks_per_call)
    total = sum(len(group) for group in groups)
    if total == 0:
        return 0

    with tqdm(total=total, unit="mask", desc=desc, disable=not progress, dynamic_ncols=True) as bar:

        def commit(group: np.ndarray, measured: Measurement, seconds: np.ndarray) -> None:
            on_group(group, measured, seconds)
            bar.update(len(group))

        run_groups = getattr(evaluator, "run_groups", None)
        if run_groups is not None:  # a worker pool (distributed.RayOracle): groups run in parallel, any order
            run_groups(groups, commit)
            return total
        for group in groups:
            began = time.perf_counter()
            measured = evaluator.measure(group)
            commit(group, measured, np.full(len(group), (time.perf_counter() - began) / len(group)))
    return total


def measure_masks(
    evaluator: MaskedEvaluator,
    store: DatasetStore,
    masks: np.ndarray,
    progress: bool = True,
    masks_per_call: int = MASKS_PER_CALL,
) -> int:
    """Evaluate the masks not yet in ``store`` (:func:`measure_in_groups`), appending each group as it finishes.

    Repeated masks in the request are measured once. Returns the number of rows added. Killing the process
    loses at most the group being measured; running again measures only what is missing.

    Example:
        >>> measure_masks(evaluator, store, parse_mask_spec("loo", store.n_layers, None, 0))  # doctest: +SKIP
        19
    """
    if evaluator.n_layers != store.n_layers:
        raise MaskError(
            f"the model has {evaluator.n_layers} decoder layers but the store {store.path} holds "
            f"{store.n_layers}-layer masks; use the store's model or another store"
        )
    check_utility(evaluator, store)
    arr = check_masks(masks, store.n_layers)
    return measure_in_groups(evaluator, arr[store.missing(arr)], lambda m, v, s: append_measured(store, m, v, s),
                             progress=progress, masks_per_call=masks_per_call)


def append_measured(store: DatasetStore, masks: np.ndarray, measured: Measurement, seconds: np.ndarray) -> None:
    """Append measured rows with their per-window values (and KL for a kl store).

    Example:
        >>> append_measured(store, group, evaluator.measure(group), np.full(len(group), 1.5))  # doctest: +SKIP
    """
    store.append(masks, measured.loss("nll"), seconds, window_nll=measured.nll,
                 kl=None if measured.kl is None else measured.loss("kl"), window_kl=measured.kl)


def check_utility(evaluator, store: DatasetStore | None) -> None:
    """A store of one utility is measured by an evaluator of the same utility, else a clear error."""
    if store is None:
        return
    mine = getattr(evaluator, "utility", "nll")
    if mine != store.utility:
        raise MaskError(f"the store {store.path} holds {store.utility!r} rows but the evaluator measures {mine!r}; "
                        f"use --utility {store.utility} or another store")


class CachedOracle:
    """Value function ``-loss`` over a :class:`MaskedEvaluator`: each distinct mask is run through the model once.

    The loss is the evaluator's utility (mean token NLL, or KL to the dense model). With a ``store`` (the
    evaluator's dataset store, of the same utility) every stored row is an answer and each measured group is
    appended to the store as it finishes, so a mask is measured at most once per store, across calls and runs.
    Without one the answers live in memory only (e.g. held-out evaluation windows). ``measured`` counts the masks
    this object ran through the model; :meth:`window_loss` gives the per-window values behind each answer (NaN
    for rows stored without them).

    Example:
        >>> oracle = CachedOracle(evaluator, store)  # doctest: +SKIP
        >>> oracle(masks)            # -loss per mask; new rows land in the store  # doctest: +SKIP
        >>> CachedOracle(MaskedEvaluator(model, eval_windows), label="held-out").loss(masks)  # doctest: +SKIP
    """

    def __init__(
        self,
        evaluator: MaskedEvaluator,
        store: DatasetStore | None = None,
        *,
        label: str = "measuring masks",
        progress: bool = True,
        masks_per_call: int = MASKS_PER_CALL,
    ) -> None:
        if store is not None and evaluator.n_layers != store.n_layers:
            raise MaskError(
                f"the model has {evaluator.n_layers} decoder layers but the store {store.path} holds "
                f"{store.n_layers}-layer masks; use the store's model or another store"
            )
        check_utility(evaluator, store)
        self.evaluator, self.store = evaluator, store
        self.n_layers = int(evaluator.n_layers)
        self.utility = getattr(evaluator, "utility", "nll")
        self.n_windows = int(getattr(evaluator, "n_windows", 0))
        self.label, self.progress, self.masks_per_call = label, progress, masks_per_call
        self.cache: dict[bytes, float] = {}
        self.windows_cache: dict[bytes, np.ndarray] = {}
        self.measured = 0
        self._store_rows = 0

    def seed(self, masks: np.ndarray, loss: np.ndarray, window_loss: np.ndarray | None = None) -> None:
        """Add rows measured elsewhere on the same model, windows and utility."""
        arr = check_masks(masks, self.n_layers)
        values = np.asarray(loss, dtype=np.float64).reshape(-1)
        for i, (m, v) in enumerate(zip(arr, values)):
            self.cache[m.tobytes()] = float(v)
            if window_loss is not None:
                self.windows_cache[m.tobytes()] = np.asarray(window_loss[i], dtype=np.float64)

    def _sync(self) -> None:
        """Take in rows appended to the store since the last call (by this object or anyone else)."""
        if self.store is not None and len(self.store) > self._store_rows:
            start = self._store_rows
            self.seed(self.store.masks[start:], self.store.loss[start:], self.store.window_loss()[start:])
            self._store_rows = len(self.store)

    def known(self, mask: np.ndarray) -> float | None:
        """The loss of ``mask`` if it has been measured, else None."""
        self._sync()
        return self.cache.get(check_masks(mask, self.n_layers)[0].tobytes())

    def _commit(self, group: np.ndarray, measured: Measurement, seconds: np.ndarray) -> None:
        if self.store is not None:
            append_measured(self.store, group, measured, seconds)
        self.seed(group, measured.loss(self.utility), measured.window_loss(self.utility))

    def loss(self, masks: np.ndarray) -> np.ndarray:
        """The utility's mean loss of each mask (measuring the unknown ones first): ``float64[k]``."""
        arr = check_masks(masks, self.n_layers)
        self._sync()
        todo = arr[[row.tobytes() not in self.cache for row in arr]]
        self.measured += measure_in_groups(self.evaluator, todo, self._commit, progress=self.progress,
                                           desc=self.label, masks_per_call=self.masks_per_call)
        self._sync()
        return np.array([self.cache[row.tobytes()] for row in arr], dtype=np.float64)

    def window_loss(self, masks: np.ndarray) -> np.ndarray:
        """Per-window losses ``float64[k, W]`` of measured masks (NaN rows where none were kept; measures the
        unknown masks first)."""
        arr = check_masks(masks, self.n_layers)
        self.loss(arr)
        empty = np.full(self.n_windows, np.nan)
        return np.array([self.windows_cache.get(row.tobytes(), empty) for row in arr], dtype=np.float64)

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Every mask this oracle knows (stored, seeded or measured) with its loss: ``(bool[k, n], float64[k])``."""
        self._sync()
        if not self.cache:
            return np.zeros((0, self.n_layers), dtype=bool), np.zeros(0, dtype=np.float64)
        masks = np.frombuffer(b"".join(self.cache), dtype=bool).reshape(-1, self.n_layers)
        return masks.copy(), np.fromiter(self.cache.values(), dtype=np.float64, count=len(self.cache))

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        return -self.loss(masks)
