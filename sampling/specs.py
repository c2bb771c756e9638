"""Parse a ``--masks SPEC`` into layer masks ``bool[k, n_layers]``.

Specs:
    ``loo``             the full model, then every leave-one-out mask (n + 1 masks)
    ``stratified``      ``n_masks`` masks stratified by removed-layer count 1 .. ceil(n/2), full + LOO first
    ``stratified-all``  the same over every removed-layer count 1 .. n (all coalition sizes, for Shapley)
    ``file:PATH``       a ``.npy`` bool / 0-1 array, or a text file with one mask per line written as
                        ``110111`` or ``1 1 0 1 1 1`` (also commas); ``#`` starts a comment

Example:
    >>> parse_mask_spec("loo", n_layers=3, n_masks=None, seed=0).astype(int).tolist()
    [[1, 1, 1], [0, 1, 1], [1, 0, 1], [1, 1, 0]]
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from layershap.core.errors import LayershapError, MaskError

from .stratified import all_removed_counts, default_removed_counts, loo_masks, stratified_masks

DEFAULT_N_MASKS = 128
VALID_FORMS = "loo, stratified, stratified-all, file:PATH (a .npy array or a text file of 0/1 rows)"


def parse_mask_spec(spec: str, n_layers: int, n_masks: int | None, seed: int) -> np.ndarray:
    """Masks ``bool[k, n_layers]`` for a spec (see the module docstring); ``n_masks`` is used by the
    stratified specs only (``None`` -> 128, capped at the number of distinct masks the strata hold).

    Example:
        >>> parse_mask_spec("stratified", 18, 200, seed=0).shape
        (200, 18)
        >>> parse_mask_spec("file:masks.txt", 18, None, 0)      # doctest: +SKIP
    """
    spec = spec.strip()
    if spec == "loo":
        return loo_masks(n_layers)
    if spec in ("stratified", "stratified-all"):
        removed = all_removed_counts(n_layers) if spec == "stratified-all" else default_removed_counts(n_layers)
        if n_masks is None:
            available = 1 + sum(math.comb(n_layers, r) for r in removed) + (0 if 1 in removed else n_layers)
            n_masks = min(DEFAULT_N_MASKS, available)
        return stratified_masks(n_layers, n_masks, seed, removed=removed)
    if spec.startswith("file:"):
        return read_mask_file(Path(spec[len("file:"):]).expanduser(), n_layers)
    raise LayershapError(f"unknown mask spec {spec!r}; valid forms: {VALID_FORMS}")


def check_mask_spec(spec: str) -> None:
    """Cheap check of a spec's form (and that a ``file:`` path exists) before any model is loaded.

    Example:
        >>> check_mask_spec("loo")
    """
    spec = spec.strip()
    if spec in ("loo", "stratified", "stratified-all"):
        return
    if spec.startswith("file:"):
        path = Path(spec[len("file:"):]).expanduser()
        if not path.is_file():
            raise LayershapError(f"mask file {path} does not exist (or is not a file); check the file:PATH spec")
        return
    raise LayershapError(f"unknown mask spec {spec!r}; valid forms: {VALID_FORMS}")


def read_mask_file(path: Path, n_layers: int) -> np.ndarray:
    """Masks from a ``.npy`` file or a text file of 0/1 rows; every bad row is a MaskError naming it.

    Example:
        >>> read_mask_file(Path("masks.txt"), 6)      # lines like "110111" or "1 1 0 1 1 1"  # doctest: +SKIP
    """
    if not path.is_file():
        raise LayershapError(f"mask file {path} does not exist (or is not a file); check the file:PATH spec")
    masks = _read_npy(path, n_layers) if path.suffix == ".npy" else _read_text(path, n_layers)
    if len(masks) == 0:
        raise MaskError(f"mask file {path} contains no masks; write one 0/1 row per mask")
    return masks


def _read_npy(path: Path, n_layers: int) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise MaskError(f"cannot read {path} as a numpy .npy array of masks: {exc}") from exc
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise MaskError(f"{path}: masks must be a 2-D array (k, {n_layers}); got shape {arr.shape}")
    if arr.shape[1] != n_layers:
        raise MaskError(
            f"{path}: masks have length {arr.shape[1]} but the model has {n_layers} decoder layers; "
            f"give one 0/1 per layer, 1 = keep"
        )
    if arr.dtype == bool:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise MaskError(f"{path}: masks must be bool or 0/1 numbers; got dtype {arr.dtype}")
    bad = np.flatnonzero(~np.isin(arr, (0, 1)).all(axis=1))
    if len(bad):
        raise MaskError(
            f"{path}: row {bad[0]} contains values other than 0/1 ({arr[bad[0]].tolist()}); "
            f"{len(bad)} bad row(s) in all"
        )
    return arr.astype(bool)


def _read_text(path: Path, n_layers: int) -> np.ndarray:
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as exc:
        raise MaskError(f"{path} is not a text file of 0/1 rows (nor a .npy file): {exc}") from exc
    rows: list[list[bool]] = []
    for number, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        tokens = re.split(r"[\s,]+", line) if re.search(r"[\s,]", line) else list(line)
        if any(t not in ("0", "1") for t in tokens):
            raise MaskError(f"{path} line {number}: {raw.strip()!r} contains something other than 0 and 1")
        if len(tokens) != n_layers:
            raise MaskError(
                f"{path} line {number}: mask has {len(tokens)} values but the model has {n_layers} decoder "
                f"layers; give one 0/1 per layer, 1 = keep"
            )
        rows.append([t == "1" for t in tokens])
    return np.array(rows, dtype=bool).reshape(-1, n_layers)
