"""Training data for the surrogate: (mask, nll) rows from a dataset store, seeded cross-validation folds
stratified by removed-layer count, and the target log(nll) standardized over all rows.

Example:
    >>> dm = MaskDataModule.from_store("runs/default/dataset.zarr", folds=5, seed=0)  # doctest: +SKIP
    >>> dm.hold_out(1); dm.target_mean, dm.target_std, len(dm.val_index), len(dm.test_index)  # doctest: +SKIP
    >>> dm = MaskDataModule(masks, nll, folds=5, seed=0)     # in-memory rows (tests, synthetic games)  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from layershap.core.errors import LayershapError
from layershap.core.masks import check_masks
from layershap.oracle.measurement import KINDS, log_offset
from layershap.oracle.store import DatasetStore

from .network import encode_masks

MIN_FOLDS = 3  # one fold scored, one for early stopping, at least one to fit on
MIN_SPLIT_ROWS = 3  # a stratum with fewer rows is never held out (two folds out could take all of it)


def stratified_folds(removed: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold id (``0 .. folds-1``) of every row, or ``-1`` for rows that are never held out.

    Within each removed-layer-count stratum the rows, in a seeded random order, are dealt round-robin to the
    folds starting at a seeded fold, so every fold gets an equal share of every stratum (±1 row). A stratum
    occupies consecutive folds, so taking two consecutive folds out (one scored, one for early stopping:
    :meth:`MaskDataModule.hold_out`) leaves every stratum of at least :data:`MIN_SPLIT_ROWS` rows some rows to
    fit on; a smaller stratum (e.g. the full model's single row) is always trained on.

    Example:
        >>> stratified_folds(np.array([0, 1, 1, 1, 2, 2, 2, 2]), 3, seed=0).tolist()
        [-1, 1, 2, 0, 1, 0, 0, 2]
    """
    removed = np.asarray(removed)
    if folds < MIN_FOLDS:
        raise LayershapError(f"nested cross-validation needs at least {MIN_FOLDS} folds, got {folds}")
    fold = np.full(len(removed), -1, dtype=np.int64)
    rng = np.random.default_rng(seed)
    for r in np.unique(removed):
        rows = np.flatnonzero(removed == r)
        if len(rows) < MIN_SPLIT_ROWS:
            continue
        order = rng.permutation(rows)
        fold[order] = (int(rng.integers(folds)) + np.arange(len(order))) % folds
    return fold


def canonical_order(masks: np.ndarray) -> np.ndarray:
    """Row order that depends only on the rows' contents (lexicographic over the mask bits).

    Example:
        >>> canonical_order(np.array([[1, 1], [0, 1], [1, 0]], bool)).tolist()
        [1, 2, 0]
    """
    arr = np.asarray(masks, dtype=bool)
    return np.lexsort(arr.T[::-1]) if len(arr) else np.zeros(0, dtype=np.int64)


def folds_for(members: int, val_fraction: float) -> int:
    """Folds of the cross-validated ensemble: one per member, at least ``round(1 / val_fraction)`` and 3.

    Example:
        >>> folds_for(3, 0.2), folds_for(10, 0.2), folds_for(1, 0.5)
        (5, 10, 3)
    """
    if not 0.0 < val_fraction < 1.0:
        raise LayershapError(f"the validation fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    return max(int(members), max(MIN_FOLDS, round(1.0 / val_fraction)))


class MaskDataModule(L.LightningDataModule):
    """(mask, standardized log-nll) batches with seeded cross-validation folds stratified by removed-layer count.

    Rows are kept in :func:`canonical_order`, so a store's rows give the same surrogate whatever order they
    were measured in.

    ``folds`` folds (see :func:`stratified_folds`); :meth:`hold_out` picks the fold a network is scored on
    (``test_index``) and the next one, on which it early-stops (``val_index``); it fits on the others
    (``train_index``). The members of an ensemble are scored on different folds and together learn from
    every row. ``nll`` holds the rows' losses in the store's ``utility`` (``nll``, ``kl`` or ``task``). The target is
    ``log(loss + offset)`` (offset 0 for nll, :data:`~layershap.oracle.measurement.KL_FLOOR` for kl) standardized with the mean and std over all rows: log-perplexities span 3 to 50 nats once
    cornerstone layers go, and on the log scale the pruning-relevant masks (nll near the full model's) are no
    longer drowned by them (Gemma-3-270M, 256 masks: 0.45 instead of 1.1 nats held-out RMSE on those masks).
    The training order of each member follows the torch seed that ``lightning.seed_everything`` set.
    """

    def __init__(
        self,
        masks: np.ndarray,
        nll: np.ndarray,
        *,
        folds: int = 5,
        seed: int = 0,
        batch_size: int = 64,
        store: DatasetStore | None = None,
        utility: str = "nll",
    ) -> None:
        super().__init__()
        masks = np.asarray(masks)
        if masks.ndim != 2:
            raise LayershapError(f"masks must be shaped (rows, n_layers); got shape {masks.shape}")
        masks = check_masks(masks, masks.shape[1])
        nll = np.asarray(nll, dtype=np.float64).reshape(-1)
        if len(nll) != len(masks):
            raise LayershapError(f"{len(masks)} masks but {len(nll)} nll values")
        order = canonical_order(masks)  # the same rows in any order give the same folds and training
        self.masks, self.nll = masks[order], nll[order]
        if utility not in KINDS:
            raise LayershapError(f"unknown utility {utility!r}; give one of {', '.join(KINDS)}")
        self.utility, self.offset = utility, log_offset(utility)
        if not np.isfinite(self.nll).all():
            raise LayershapError(f"the {utility} values contain NaN or infinity; only finite measurements can be "
                                 "learned")
        if utility in ("nll", "task") and not (self.nll > 0).all():
            raise LayershapError(
                f"the nll values must be positive (mean token negative log-likelihood); got minimum "
                f"{self.nll.min():.6g}. Store log-perplexities, not log-likelihoods or accuracies"
            )
        if utility == "kl" and not (self.nll >= 0).all():
            raise LayershapError(f"the kl values must be >= 0 (a divergence); got minimum {self.nll.min():.6g}")
        if len(self.nll) < 4:
            raise LayershapError(
                f"only {len(self.nll)} measured masks: a surrogate needs a few dozen at least; measure more with "
                f"`layershap oracle --masks stratified --n-masks N`"
            )
        if batch_size < 1:
            raise LayershapError(f"batch size must be >= 1, got {batch_size}")
        self.store = store
        self.seed, self.folds, self.batch_size = seed, int(folds), batch_size
        self.removed = (~self.masks).sum(axis=1)
        self.fold_of = stratified_folds(self.removed, self.folds, seed)
        if (self.fold_of < 0).all():
            raise LayershapError(
                f"no row can be held out for validation from {len(self.nll)} masks: every removed-layer count "
                f"has fewer than {MIN_SPLIT_ROWS} masks; measure more masks (e.g. `layershap oracle --masks "
                "stratified --n-masks 64`)"
            )
        if self.nll.min() == self.nll.max():
            raise LayershapError("every mask has the same nll; there is nothing to learn")
        log_nll = np.log(self.nll + self.offset)
        self.target_mean = float(log_nll.mean())
        self.target_std = float(log_nll.std())
        self.hold_out(0)

    def hold_out(self, fold: int) -> None:
        """Score on fold ``fold`` (``0 .. folds-1``: ``test_index``), early-stop on fold ``fold + 1 mod folds``
        (``val_index``) and fit on every other row (``train_index``); the three never share a row.

        Example:
            >>> dm.hold_out(2); dm.fold, dm.stop_fold      # (2, 3) with 5 folds; (4, 0) for hold_out(4)  # doctest: +SKIP
        """
        if not 0 <= fold < self.folds:
            raise ValueError(f"fold must be in 0..{self.folds - 1}, got {fold}")
        self.fold, self.stop_fold = fold, (fold + 1) % self.folds
        self.test_index = np.flatnonzero(self.fold_of == fold)
        self.val_index = np.flatnonzero(self.fold_of == self.stop_fold)
        self.train_index = np.flatnonzero((self.fold_of != fold) & (self.fold_of != self.stop_fold))

    @classmethod
    def from_store(cls, store: str | Path | DatasetStore, **kwargs) -> MaskDataModule:
        """Data module over the finished rows of a dataset store (a path or an open ``DatasetStore``), on the
        store's utility (its ``loss``: nll or kl).

        Example:
            >>> dm = MaskDataModule.from_store("runs/default/dataset.zarr", seed=0)   # doctest: +SKIP
        """
        if not isinstance(store, DatasetStore):
            store = DatasetStore.open(store)
        return cls(store.masks, store.loss, store=store, utility=store.utility, **kwargs)

    # ---------------------------------------------------------------- views
    @property
    def n_layers(self) -> int:
        return int(self.masks.shape[1])

    @property
    def removed_counts(self) -> list[int]:
        """Sorted removed-layer counts present in the rows (every fold trains on all of them)."""
        return sorted(int(r) for r in np.unique(self.removed))

    @property
    def full_target(self) -> float | None:
        """Standardized target of the full model (no layer removed) when it is among the rows, else ``None``:
        the anchor every network is built on (see :class:`~layershap.surrogate.network.MaskNet`)."""
        full = np.flatnonzero(self.removed == 0)
        return None if len(full) == 0 else float(self.standardize(self.nll[full[:1]])[0])

    def standardize(self, nll: np.ndarray) -> np.ndarray:
        """loss (nats) -> the training target ``(log(loss + offset) - target_mean) / target_std``."""
        return (np.log(np.asarray(nll, dtype=np.float64) + self.offset) - self.target_mean) / self.target_std

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
