"""Layer masks, the one representation every part of layershap shares: ``bool[k, n_layers]``, True = kept.

One checker (:func:`check_masks`), one builder from removed-layer sets (:func:`masks_from_removed`), one from
integer codes (:func:`masks_from_ints`), one check of a removal count K (:func:`check_removal_count`).

Example:
    >>> masks_from_removed([[1, 3]], 4).astype(int).tolist()
    [[1, 0, 1, 0]]
    >>> removed_text(np.array([True, False, True, False]))
    '1, 3'
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import LayershapError, MaskError


def check_masks(masks, n_layers: int) -> np.ndarray:
    """Validate masks and return them as ``bool[k, n_layers]`` (a 1-D mask becomes one row; a torch tensor is
    converted).

    Example:
        >>> check_masks([1, 0, 1], 3).tolist()
        [[True, False, True]]
    """
    arr = masks.detach().cpu().numpy() if hasattr(masks, "detach") else np.asarray(masks)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise MaskError(f"masks must be shaped (k, n_layers); got an array of shape {arr.shape}")
    if arr.shape[1] != n_layers:
        raise MaskError(
            f"mask length {arr.shape[1]} does not match the model's {n_layers} decoder layers; "
            f"give one True/False (1/0) per layer, True = keep"
        )
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise MaskError("masks must contain only True/False or 0/1 values")
        arr = arr.astype(bool)
    return arr


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


def masks_from_removed(removed: Sequence[int] | Sequence[Sequence[int]] | np.ndarray, n_layers: int) -> np.ndarray:
    """Masks ``bool[m, n_layers]`` from removal sets (False at the removed layers, 0-based), one row per set.

    The sets may differ in size (``[(), (3,), (1, 4)]``: full model, one and two layers removed). A non-empty flat
    list is one removal set (one row); an empty list is no set (zero rows). Out-of-range or repeated indices are a
    :class:`MaskError`.

    Example:
        >>> masks_from_removed([[0, 2]], 3).astype(int).tolist()
        [[0, 1, 0]]
        >>> masks_from_removed([1, 3], 4)[0].tolist()
        [True, False, True, False]
        >>> masks_from_removed([(), (1,)], 2).tolist()
        [[True, True], [True, False]]
    """
    if not isinstance(removed, np.ndarray) and len(removed) == 0:
        return np.ones((0, n_layers), dtype=bool)
    if not isinstance(removed, np.ndarray) and all(np.ndim(s) == 1 for s in removed):
        rows = [np.asarray(s, dtype=np.int64) for s in removed]
        if len({r.size for r in rows}) > 1:  # sets of different sizes: one row at a time
            return np.concatenate([masks_from_removed(r[None, :], n_layers) for r in rows])
    sets = np.asarray(removed, dtype=np.int64)
    if sets.ndim == 1:
        sets = sets[None, :]
    if sets.ndim != 2:
        raise MaskError(f"removal sets must be shaped (m, K); got shape {sets.shape}")
    bad = np.unique(sets[(sets < 0) | (sets >= n_layers)])
    if bad.size:
        raise MaskError(f"layer indices {bad.tolist()} are out of range: the model has layers 0..{n_layers - 1}")
    ordered = np.sort(sets, axis=1)
    dup = np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1))
    if dup.size:
        raise MaskError(f"layer indices {sets[dup[0]].tolist()} contain duplicates; name each layer to remove once")
    masks = np.ones((sets.shape[0], n_layers), dtype=bool)
    masks[np.repeat(np.arange(sets.shape[0]), sets.shape[1]), sets.ravel()] = False
    return masks


def masks_from_ints(codes: np.ndarray, n: int) -> np.ndarray:
    """Masks ``bool[k, n]`` whose bit ``j`` of ``codes[k]`` is layer ``j`` (bit set = layer kept).

    Example:
        >>> masks_from_ints(np.array([5]), 3).astype(int).tolist()
        [[1, 0, 1]]
    """
    shifts = np.arange(n, dtype=np.int64)
    return ((np.asarray(codes, dtype=np.int64)[:, None] >> shifts) & 1).astype(bool)


def check_removal_count(k: int, n_layers: int) -> int:
    """``k`` if ``1 <= k <= n_layers - 1`` (at least one layer removed, at least one kept), else a LayershapError.

    Example:
        >>> check_removal_count(4, 18)
        4
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k < n_layers:
        raise LayershapError(f"cannot remove {k} of {n_layers} layers; choose 1 <= K <= {n_layers - 1}")
    return int(k)


def removed_text(mask: np.ndarray) -> str:
    """The removed layers of a mask as ``3, 7`` (0-based), or ``none``.

    Example:
        >>> removed_text(np.array([True, False, True, False]))
        '1, 3'
    """
    idx = np.flatnonzero(~np.asarray(mask, dtype=bool))
    return ", ".join(str(i) for i in idx) if len(idx) else "none"
