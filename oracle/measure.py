"""Measure layer masks with the real model and append each finished row to the dataset store.

Example:
    >>> ev = MaskedEvaluator(loaded.model, windows, batch_size=4)
    >>> store = DatasetStore.create_or_open(out, dataset_identity(loaded, text.text_id, windows, 128), windows)
    >>> measure_masks(ev, store, loo_masks(ev.n_layers))      # rows added; already stored masks are skipped
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from .errors import MaskError
from .layers import check_masks, find_layers, layer_types
from .prefix import trie_order

# Masks per evaluator call, taken in trie order: 128 stratified masks of an 18-layer model need 920 layer
# forwards in groups of 32 (909 all at once, 1694 without sharing; 1350 in request-order groups of 8),
# and a kill loses at most one group (~1 minute for Gemma-3-270M on 2 CPU cores).
MASKS_PER_CALL = 32

if TYPE_CHECKING:
    from .evaluate import MaskedEvaluator
    from .loading import LoadedModel
    from .store import DatasetStore


def dataset_identity(loaded: LoadedModel, text_id: str, windows: np.ndarray, seq_len: int) -> dict:
    """The identity attributes of a store measured with ``loaded`` on ``windows`` cut from text ``text_id``.

    Example:
        >>> ident = dataset_identity(loaded, "builtin", windows, seq_len=128)
        >>> DatasetStore.create_or_open("x.zarr", ident, windows)
    """
    from .text import windows_sha256

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
    }


def unique_rows(masks: np.ndarray) -> np.ndarray:
    """``masks`` without repeated rows, first occurrences in their original order.

    Example:
        >>> unique_rows(np.array([[1, 0], [1, 0], [0, 1]], bool)).astype(int).tolist()
        [[1, 0], [0, 1]]
    """
    seen: set[bytes] = set()
    keep = []
    for i, row in enumerate(masks):
        key = row.tobytes()
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return masks[keep]


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
    from tqdm.auto import tqdm

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


class StoreOracle:
    """Value function ``-nll`` backed by a dataset store: masks not stored yet are measured and appended first.

    Every mask is run through the model at most once per store, across calls and across runs.

    Example:
        >>> oracle = StoreOracle(evaluator, store)
        >>> oracle(masks)            # -nll per mask; new rows land in the store
    """

    def __init__(self, evaluator: MaskedEvaluator, store: DatasetStore, progress: bool = True) -> None:
        self.evaluator = evaluator
        self.store = store
        self.progress = progress
        self.n_layers = store.n_layers

    def nll(self, masks: np.ndarray) -> np.ndarray:
        """Stored mean NLL of each mask (measuring the missing ones first): ``float64[k]``."""
        arr = check_masks(masks, self.n_layers)
        measure_masks(self.evaluator, self.store, arr, progress=self.progress)
        lookup = {row.tobytes(): float(v) for row, v in zip(self.store.masks, self.store.nll)}
        return np.array([lookup[row.tobytes()] for row in arr], dtype=np.float64)

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        return -self.nll(masks)
