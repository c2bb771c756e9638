"""Training data for the surrogate: (mask, nll) rows from a dataset store, a seeded held-out split
stratified by removed-layer count, and nll standardized with the training rows' mean and std.

Example:
    >>> dm = MaskDataModule.from_store("runs/default/dataset.zarr", val_fraction=0.2, seed=0)
    >>> dm.nll_mean, dm.nll_std, len(dm.val_index)
    >>> dm = MaskDataModule.from_arrays(masks, nll)        # no store needed (tests, synthetic games)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from layershap.oracle.errors import LayershapError
from layershap.oracle.layers import check_masks

from .network import encode_masks

if TYPE_CHECKING:
    from layershap.oracle.store import DatasetStore


def stratified_split(removed: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(train, val)``: about ``val_fraction`` of the rows held out, drawn within each
    removed-count stratum in proportion to its size (largest remainders first), every stratum keeping at
    least one training row. Seeded; both index arrays sorted.

    Example:
        >>> train, val = stratified_split(np.array([1, 1, 2, 2, 2, 2, 3, 3, 3, 3]), 0.2, seed=0)
        >>> len(train), len(val)
        (8, 2)
    """
    removed = np.asarray(removed)
    if not 0.0 < val_fraction < 1.0:
        raise LayershapError(f"the validation fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    strata, counts = np.unique(removed, return_counts=True)
    target = min(math.floor(val_fraction * len(removed) + 0.5), int((counts - 1).sum()))
    room = counts - 1
    quota = np.minimum(np.floor(val_fraction * counts).astype(int), room)
    frac = val_fraction * counts - np.floor(val_fraction * counts)
    for i in np.argsort(-frac, kind="stable"):  # hand out the rest by largest fractional part
        if quota.sum() >= target:
            break
        if quota[i] < room[i]:
            quota[i] += 1
    i = 0
    while quota.sum() < target:  # fractions exhausted (tiny strata): fill where there is room
        if quota[i % len(strata)] < room[i % len(strata)]:
            quota[i % len(strata)] += 1
        i += 1
    rng = np.random.default_rng(seed)
    val = [rng.permutation(np.flatnonzero(removed == r))[:q] for r, q in zip(strata, quota)]
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(removed)), val_idx)
    return train_idx, val_idx


class MaskDataModule(L.LightningDataModule):
    """(mask, standardized nll) batches with a fixed, seeded, removed-count-stratified validation split.

    The split depends only on ``seed`` and the rows, so every ensemble member sees the same split.
    The training order of each member follows the torch seed that ``lightning.seed_everything`` set.
    """

    def __init__(
        self,
        masks: np.ndarray,
        nll: np.ndarray,
        *,
        val_fraction: float = 0.2,
        seed: int = 0,
        batch_size: int = 64,
        store: DatasetStore | None = None,
    ) -> None:
        super().__init__()
        masks = np.asarray(masks)
        if masks.ndim != 2:
            raise LayershapError(f"masks must be shaped (rows, n_layers); got shape {masks.shape}")
        self.masks = check_masks(masks, masks.shape[1])
        self.nll = np.asarray(nll, dtype=np.float64).reshape(-1)
        if len(self.nll) != len(self.masks):
            raise LayershapError(f"{len(self.masks)} masks but {len(self.nll)} nll values")
        if not np.isfinite(self.nll).all():
            raise LayershapError("the nll values contain NaN or infinity; only finite measurements can be learned")
        if len(self.nll) < 4:
            raise LayershapError(
                f"only {len(self.nll)} measured masks: a surrogate needs a few dozen at least; measure more with "
                f"`layershap oracle --masks stratified --n-masks N`"
            )
        if batch_size < 1:
            raise LayershapError(f"batch size must be >= 1, got {batch_size}")
        self.store = store
        self.seed, self.val_fraction, self.batch_size = seed, val_fraction, batch_size
        self.removed = (~self.masks).sum(axis=1)
        self.train_index, self.val_index = stratified_split(self.removed, val_fraction, seed)
        if len(self.val_index) == 0:
            raise LayershapError(
                f"no row could be held out for validation from {len(self.nll)} masks (val_fraction="
                f"{val_fraction}); measure more masks or raise --val-fraction"
            )
        train_nll = self.nll[self.train_index]
        self.nll_mean = float(train_nll.mean())
        self.nll_std = float(train_nll.std())
        if not self.nll_std > 0:
            raise LayershapError("every training mask has the same nll; there is nothing to learn")

    @classmethod
    def from_arrays(cls, masks: np.ndarray, nll: np.ndarray, **kwargs) -> MaskDataModule:
        """Data module over in-memory rows (same keyword arguments as the constructor).

        Example:
            >>> dm = MaskDataModule.from_arrays(masks, nll, val_fraction=0.25, seed=1)   # doctest: +SKIP
        """
        return cls(masks, nll, **kwargs)

    @classmethod
    def from_store(cls, store: str | Path | DatasetStore, **kwargs) -> MaskDataModule:
        """Data module over the finished rows of a dataset store (a path or an open ``DatasetStore``).

        Example:
            >>> dm = MaskDataModule.from_store("runs/default/dataset.zarr", seed=0)   # doctest: +SKIP
        """
        from layershap.oracle.store import DatasetStore

        if not isinstance(store, DatasetStore):
            store = DatasetStore.open(store)
        return cls(store.masks, store.nll, store=store, **kwargs)

    # ---------------------------------------------------------------- views
    @property
    def n_layers(self) -> int:
        return int(self.masks.shape[1])

    @property
    def removed_counts(self) -> list[int]:
        """Sorted removed-layer counts present in the training rows."""
        return sorted(int(r) for r in np.unique(self.removed[self.train_index]))

    def standardize(self, nll: np.ndarray) -> np.ndarray:
        return (np.asarray(nll, dtype=np.float64) - self.nll_mean) / self.nll_std

    def _dataset(self, index: np.ndarray) -> TensorDataset:
        x = encode_masks(self.masks[index])
        y = torch.from_numpy(self.standardize(self.nll[index])).to(torch.float32)
        return TensorDataset(x, y)

    # ---------------------------------------------------------------- loaders
    def setup(self, stage: str | None = None) -> None:
        self._train = self._dataset(self.train_index)
        self._val = self._dataset(self.val_index)

    def train_dataloader(self) -> DataLoader:
        # Whole batches are gathered by tensor indexing (no per-row collate); the shuffling generator is
        # seeded from torch's seed, which lightning.seed_everything set for this member.
        generator = torch.Generator().manual_seed(torch.initial_seed())
        sampler = BatchSampler(RandomSampler(self._train, generator=generator), self.batch_size, drop_last=False)
        return DataLoader(self._train, batch_size=None, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        sampler = BatchSampler(SequentialSampler(self._val), max(1, len(self._val)), drop_last=False)
        return DataLoader(self._val, batch_size=None, sampler=sampler)
