"""Measure layer masks with the real model and append each finished row to the dataset store.

:class:`CachedOracle` is the one cached value function ``-nll`` over the real model: every distinct mask runs
through the model once; with a store, stored rows are answers and new rows are appended as they finish.

Example:
    >>> ev = MaskedEvaluator(loaded.model, windows, batch_size=4)
    >>> store = DatasetStore.create_or_open(out, dataset_identity(loaded, text.text_id, windows, 128), windows)
    >>> measure_masks(ev, store, loo_masks(ev.n_layers))      # rows added; already stored masks are skipped
    >>> CachedOracle(ev, store)(masks)                        # -nll per mask, missing ones measured first
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
from .prefix import trie_order
from .store import DatasetStore
from .text import windows_sha256

# Masks per evaluator call, taken in trie order: 128 stratified masks of an 18-layer model need 920 layer
# forwards in groups of 32 (909 all at once, 1694 without sharing; 1350 in request-order groups of 8),
# and a kill loses at most one group (~1 minute for Gemma-3-270M on 2 CPU cores).
MASKS_PER_CALL = 32


def dataset_identity(loaded: LoadedModel, text_id: str, windows: np.ndarray, seq_len: int, *,
                     game: str = "blocks", utility: str = "nll") -> dict:
    """The identity attributes of a store measured with ``loaded`` on ``windows`` cut from text ``text_id``
    (``game``: what a False in a mask removes; ``utility``: what a row measures).

    Example:
        >>> ident = dataset_identity(loaded, "builtin", windows, seq_len=128)
        >>> DatasetStore.create_or_open("x.zarr", ident, windows)
    """
    model = loaded.model
    windows = np.asarray(windows)
    return {
        "model_id": loaded.model_id,
        "model_hash": loaded.model_hash,
        "n_layers": find_layers(model).n_layers,
        "layer_types": layer_types(model),
        "text_id": text_id,
        "windows_sha256": windows_sha256(windows),
        "n_windows": int(windows.shape[0]),
        "seq_len": int(seq_len),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "game": game,
        "utility": utility,
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
    on_group: Callable[[np.ndarray, np.ndarray, np.ndarray], None],
    *,
    progress: bool = True,
    desc: str = "measuring masks",
    masks_per_call: int = MASKS_PER_CALL,
) -> int:
    """Run distinct ``masks`` through ``evaluator`` in kept-layer trie order, ``masks_per_call`` at a time.

    After each group, ``on_group(group_masks, nll, seconds)`` gets the group's rows (``seconds``: each row's
    share of the group's wall-clock time), so callers commit results as they finish. Consecutive masks in trie
    order (:func:`~layershap.oracle.prefix.trie_order`) share long kept-layer prefixes, which each group
    computes once. An evaluator with a ``run_groups(groups, on_group)`` method (a pool of workers,
    :class:`~layershap.oracle.distributed.RayOracle`) gets all groups at once and finishes them in any order.
    Returns the number of masks measured.

    Example:
        >>> measure_in_groups(evaluator, masks, lambda m, v, s: print(len(m)), progress=False)
    """
    groups = trie_groups(masks, masks_per_call)
    total = sum(len(group) for group in groups)
    if total == 0:
        return 0

    with tqdm(total=total, unit="mask", desc=desc, disable=not progress, dynamic_ncols=True) as bar:

        def commit(group: np.ndarray, nll: np.ndarray, seconds: np.ndarray) -> None:
            on_group(group, nll, seconds)
            bar.update(len(group))

        run_groups = getattr(evaluator, "run_groups", None)
        if run_groups is not None:  # a worker pool (distributed.RayOracle): groups run in parallel, any order
            run_groups(groups, commit)
            return total
        for group in groups:
            began = time.perf_counter()
            nll = evaluator.nll(group)
            commit(group, nll, np.full(len(group), (time.perf_counter() - began) / len(group)))
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
        >>> measure_masks(evaluator, store, parse_mask_spec("loo", store.n_layers, None, 0))
        19
    """
    if evaluator.n_layers != store.n_layers:
        raise MaskError(
            f"the model has {evaluator.n_layers} decoder layers but the store {store.path} holds "
            f"{store.n_layers}-layer masks; use the store's model or another store"
        )
    arr = check_masks(masks, store.n_layers)
    return measure_in_groups(evaluator, arr[store.missing(arr)], store.append, progress=progress,
                             masks_per_call=masks_per_call)


class CachedOracle:
    """Value function ``-nll`` over a :class:`MaskedEvaluator`: each distinct mask is run through the model once.

    With a ``store`` (the evaluator's dataset store) every stored row is an answer and each measured group is
    appended to the store as it finishes, so a mask is measured at most once per store, across calls and runs.
    Without one the answers live in memory only (e.g. held-out evaluation windows). ``measured`` counts the
    masks this object ran through the model.

    Example:
        >>> oracle = CachedOracle(evaluator, store)
        >>> oracle(masks)            # -nll per mask; new rows land in the store
        >>> CachedOracle(MaskedEvaluator(model, eval_windows), label="held-out").nll(masks)
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
        self.evaluator, self.store = evaluator, store
        self.n_layers = int(evaluator.n_layers)
        self.label, self.progress, self.masks_per_call = label, progress, masks_per_call
        self.cache: dict[bytes, float] = {}
        self.measured = 0
        self._store_rows = 0

    def seed(self, masks: np.ndarray, nll: np.ndarray) -> None:
        """Add rows measured elsewhere on the same model and windows."""
        for m, v in zip(check_masks(masks, self.n_layers), np.asarray(nll, dtype=np.float64).reshape(-1)):
            self.cache[m.tobytes()] = float(v)

    def _sync(self) -> None:
        """Take in rows appended to the store since the last call (by this object or anyone else)."""
        if self.store is not None and len(self.store) > self._store_rows:
            self.seed(self.store.masks[self._store_rows :], self.store.nll[self._store_rows :])
            self._store_rows = len(self.store)

    def known(self, mask: np.ndarray) -> float | None:
        """The nll of ``mask`` if it has been measured, else None."""
        self._sync()
        return self.cache.get(check_masks(mask, self.n_layers)[0].tobytes())

    def _commit(self, group: np.ndarray, nll: np.ndarray, seconds: np.ndarray) -> None:
        if self.store is not None:
            self.store.append(group, nll, seconds)
        self.seed(group, nll)

    def nll(self, masks: np.ndarray) -> np.ndarray:
        """Mean NLL of each mask (measuring the unknown ones first): ``float64[k]``."""
        arr = check_masks(masks, self.n_layers)
        self._sync()
        todo = arr[[row.tobytes() not in self.cache for row in arr]]
        self.measured += measure_in_groups(self.evaluator, todo, self._commit, progress=self.progress,
                                           desc=self.label, masks_per_call=self.masks_per_call)
        self._sync()
        return np.array([self.cache[row.tobytes()] for row in arr], dtype=np.float64)

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Every mask this oracle knows (stored, seeded or measured) with its nll: ``(bool[k, n], float64[k])``."""
        self._sync()
        if not self.cache:
            return np.zeros((0, self.n_layers), dtype=bool), np.zeros(0, dtype=np.float64)
        masks = np.frombuffer(b"".join(self.cache), dtype=bool).reshape(-1, self.n_layers)
        return masks.copy(), np.fromiter(self.cache.values(), dtype=np.float64, count=len(self.cache))

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        return -self.nll(masks)
