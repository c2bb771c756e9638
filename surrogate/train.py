"""Train the surrogate ensemble: K MLP members (different seeds, each validating on its own cross-validation
fold), early stopping on validation loss, best-epoch weights kept, deterministic on CPU. Writes into ``out_dir``:

- ``member_<i>.pt`` + ``metadata.json`` (model id/hash, n_layers, dataset hash, target normalisation, removed
  counts of the rows, architecture, training settings, validation metrics): see checkpoint.py;
- ``validation.npz``: held-out ``masks``, ``measured`` nll, out-of-fold ``predicted`` nll, ensemble
  ``predicted_std``;
- ``fit.png``: out-of-fold predicted vs measured;
- ``history.csv``: member, epoch, train_loss, val_loss (standardized units).

Example:
    >>> surrogate = train_surrogate("runs/default/dataset.zarr", "runs/default/surrogate", members=3)
    >>> surrogate.metadata["metrics"]["overall"]["spearman"]
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from tqdm.auto import tqdm

from layershap.core.errors import LayershapError
from layershap.oracle.store import DatasetStore

from .checkpoint import TARGET, Surrogate
from .data import MaskDataModule, folds_for
from .metrics import fit_metrics
from .model import MaskMLP
from .network import DEFAULT_HIDDEN, MaskNet
from .plot_fit import VALIDATION_FILE, plot_fit

STORE_KEYS = ("model_id", "model_hash", "layer_types", "text_id", "windows_sha256", "n_windows", "seq_len", "dtype")


def member_seeds(seed: int, members: int) -> list[int]:
    """Independent per-member seeds derived from ``seed`` (``np.random.SeedSequence(seed).spawn``).

    Example:
        >>> member_seeds(0, 2) == member_seeds(0, 3)[:2]
        True
    """
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(members)]


def train_surrogate(
    store: str | Path | DatasetStore,
    out_dir: str | Path,
    *,
    members: int = 1,
    seed: int = 0,
    hidden: int = DEFAULT_HIDDEN,
    max_epochs: int = 500,
    val_fraction: float = 0.2,
    progress: bool = True,
    depth: int = 2,
    patience: int = 50,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 64,
) -> Surrogate:
    """Train on the finished rows of a dataset store (a path or an open store); returns the saved surrogate
    (see :func:`train_ensemble`), its held-out metrics in ``metadata["metrics"]``.

    Example:
        >>> train_surrogate("data.zarr", "surrogate", members=3, seed=0).metadata["metrics"]["overall"]["r2"]
    """
    if not isinstance(store, DatasetStore):
        store = DatasetStore.open(store)
    dm = MaskDataModule.from_store(store, folds=folds_for(members, val_fraction), seed=seed, batch_size=batch_size)
    attrs = store.attrs
    provenance = {
        "model_id": attrs.get("model_id"), "model_hash": attrs.get("model_hash"),
        "dataset_hash": store.content_hash(), "dataset_path": str(Path(store.path).resolve()),
        "dataset": {k: attrs.get(k) for k in STORE_KEYS if k != "model_id" and k != "model_hash"},
    }
    return train_ensemble(
        dm, out_dir, provenance=provenance, members=members, seed=seed, hidden=hidden, depth=depth,
        max_epochs=max_epochs, patience=patience, lr=lr, weight_decay=weight_decay, progress=progress,
    )


def train_ensemble(
    dm: MaskDataModule,
    out_dir: str | Path,
    *,
    provenance: dict | None = None,
    members: int = 1,
    seed: int = 0,
    hidden: int = DEFAULT_HIDDEN,
    depth: int = 2,
    max_epochs: int = 500,
    patience: int = 50,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    progress: bool = True,
) -> Surrogate:
    """Train ``members`` networks on ``dm``, write the surrogate into ``out_dir`` and return it.

    ``provenance``: model_id, model_hash, dataset_hash, ... copied into metadata.json (for in-memory data
    pass e.g. ``{"model_id": "synthetic", "model_hash": None, "dataset_hash": None}``).
    Member ``i`` validates (early stopping, best epoch) on fold ``i mod dm.folds`` and trains on the rest, so the
    ensemble learns from every row. ``metadata["metrics"]`` of the returned surrogate is
    ``{"overall": {...}, "by_removed": [...]}`` of :func:`~layershap.surrogate.metrics.fit_metrics` on the
    out-of-fold predictions: each held-out row predicted by the member(s) that did not train on it
    (cross-validation, never a row a member saw).

    Example:
        >>> dm = MaskDataModule(masks, nll, folds=5, seed=0)
        >>> train_ensemble(dm, "out", members=3, hidden=64).metadata["metrics"]["overall"]["spearman"]
    """
    if members < 1:
        raise LayershapError(f"--members must be >= 1, got {members}")
    if max_epochs < 1 or patience < 1 or hidden < 1 or depth < 1:
        raise LayershapError("max_epochs, patience, hidden and depth must all be >= 1")
    for i in range(members):
        fold = i % dm.folds
        if not (dm.fold_of == fold).any():
            raise LayershapError(
                f"only {len(dm.nll)} measured masks: cross-validation fold {fold} of {dm.folds} gets no row, so "
                f"member {i + 1} has nothing to validate on; measure more masks (e.g. `layershap oracle --masks "
                f"stratified --n-masks 64`) or train fewer --members"
            )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seeds = member_seeds(seed, members)
    nets, runs, history = [], [], []
    for i, s in enumerate(seeds):
        dm.hold_out(i % dm.folds)
        net, run, hist = fit_member(
            dm, s, hidden=hidden, depth=depth, max_epochs=max_epochs, patience=patience, lr=lr,
            weight_decay=weight_decay, progress=progress, label=f"member {i + 1}/{members}",
        )
        run["fold"] = dm.fold
        nets.append(net)
        runs.append(run)
        history += [(i, *row) for row in hist]
    provenance = dict(provenance or {})
    metadata = {
        "model_id": provenance.pop("model_id", None), "model_hash": provenance.pop("model_hash", None),
        "n_layers": dm.n_layers, "dataset_hash": provenance.pop("dataset_hash", None),
        "target": TARGET, "target_mean": dm.target_mean, "target_std": dm.target_std,
        "removed_counts": dm.removed_counts,
        **provenance,
        "split": {"rows": len(dm.nll), "folds": dm.folds, "seed": dm.seed, "stratified_by": "removed-layer count",
                  "held_out": int(np.isin(dm.fold_of, [run["fold"] for run in runs]).sum()),
                  "rule": "member i validates on fold i mod folds"},
        "training": {"seed": seed, "members": members, "member_seeds": seeds, "max_epochs": max_epochs,
                     "patience": patience, "lr": lr, "weight_decay": weight_decay, "batch_size": dm.batch_size,
                     "loss": "mse on standardized log(nll), weight 1/(1 + removed layers)",
                     "optimizer": "adam", "runs": runs},
    }
    surrogate = Surrogate(nets, metadata)
    oof_sum = np.zeros(len(dm.nll))
    oof_count = np.zeros(len(dm.nll), dtype=np.int64)
    for i, run in enumerate(runs):  # out-of-fold: each member predicts the rows of the fold it validated on
        rows = np.flatnonzero(dm.fold_of == run["fold"])
        oof_sum[rows] += surrogate.member(i).predict_nll(dm.masks[rows])
        oof_count[rows] += 1
    held = np.flatnonzero(oof_count > 0)
    val_masks, val_nll = dm.masks[held], dm.nll[held]
    predicted = oof_sum[held] / oof_count[held]
    spread = surrogate.predict_std(val_masks)
    metrics = fit_metrics(val_masks, val_nll, predicted)
    metadata["metrics"] = metrics
    metadata["training"]["seconds"] = round(time.perf_counter() - started, 3)
    surrogate.save(out)
    np.savez(out / VALIDATION_FILE, masks=val_masks, measured=val_nll, predicted=predicted, predicted_std=spread)
    plot_fit(val_nll, predicted, (~val_masks).sum(axis=1), out / "fit.png", predicted_std=spread,
             title=f"surrogate, out-of-fold on {len(val_nll)} masks ({members} member{'s' * (members > 1)})")
    lines = ["member,epoch,train_loss,val_loss"] + [f"{m},{e},{t!r},{v!r}" for m, e, t, v in history]
    (out / "history.csv").write_text("\n".join(lines) + "\n")
    return surrogate


class _BestWeights(Callback):
    """Keeps the weights of the epoch with the lowest ``val_loss`` in memory, and the loss history."""

    def __init__(self) -> None:
        self.best_loss = float("inf")
        self.best_epoch = -1
        self.state: dict[str, torch.Tensor] | None = None
        self.history: list[tuple[int, float, float]] = []
        self._val = float("nan")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._val = float(trainer.callback_metrics["val_loss"])
        if self._val < self.best_loss:
            self.best_loss, self.best_epoch = self._val, trainer.current_epoch
            self.state = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        train_loss = float(trainer.callback_metrics.get("train_loss", float("nan")))
        self.history.append((trainer.current_epoch, train_loss, self._val))


class _EpochBar(Callback):
    """One tqdm bar per member over epochs, showing the validation loss."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label = total, label
        self.bar: tqdm | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.bar = tqdm(total=self.total, desc=f"training surrogate {self.label}", unit="epoch", leave=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.bar is not None
        val = trainer.callback_metrics.get("val_loss")
        if val is not None:
            self.bar.set_postfix(val_loss=f"{float(val):.4f}", refresh=False)
        self.bar.update(1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None:
            if trainer.should_stop and self.bar.n < self.total:
                self.bar.set_description(f"training surrogate {self.label} (early stop)")
            self.bar.close()


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-fit banners and the few-workers hint; train on one CPU thread (small batches:
    more threads only add synchronisation, 10-100x slower on a busy machine); restore torch's global
    determinism flag and thread count afterwards."""
    names = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed", "lightning.pytorch")
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")  # Lightning vs new torch
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def fit_member(
    dm: MaskDataModule,
    seed: int,
    *,
    hidden: int = DEFAULT_HIDDEN,
    depth: int = 2,
    max_epochs: int = 500,
    patience: int = 50,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    progress: bool = True,
    label: str = "",
) -> tuple[MaskNet, dict, list[tuple[int, float, float]]]:
    """Train one network (seeded, deterministic, CPU); returns it with its best-validation-epoch weights,
    a summary ``{"seed", "epochs", "best_epoch", "best_val_loss"}`` and the per-epoch loss history.

    Example:
        >>> net, run, history = fit_member(dm, seed=1, hidden=64, max_epochs=100, progress=False)
    """
    with _quiet_lightning():
        L.seed_everything(seed, workers=True, verbose=False)
        module = MaskMLP(dm.n_layers, hidden=hidden, depth=depth, lr=lr, weight_decay=weight_decay,
                         anchor=dm.full_target)
        best = _BestWeights()
        callbacks: list[Callback] = [EarlyStopping(monitor="val_loss", mode="min", patience=patience), best]
        if progress:
            callbacks.append(_EpochBar(max_epochs, label))
        trainer = L.Trainer(
            accelerator="cpu", devices=1, deterministic=True, max_epochs=max_epochs, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, callbacks=callbacks,
        )
        trainer.fit(module, datamodule=dm)
    if best.state is None:
        raise RuntimeError("training ran no validation epoch")
    module.net.load_state_dict(best.state)
    run = {"seed": seed, "epochs": trainer.current_epoch, "best_epoch": best.best_epoch,
           "best_val_loss": best.best_loss}
    return module.net.eval(), run, best.history
