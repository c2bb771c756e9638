"""Train the surrogate ensemble: K MLP members (different seeds), early stopping on validation loss, best-epoch
weights kept, deterministic on CPU; held-out metrics by nested cross-validation (each held-out row predicted by
a network that neither fitted nor early-stopped on it: :func:`train_ensemble`). Writes into ``out_dir``:

- ``member_<i>.pt`` + ``metadata.json`` (model id/hash, n_layers, dataset hash, target normalisation, removed
  counts of the rows, architecture, training settings, validation metrics): see checkpoint.py;
- ``validation.npz``: held-out ``masks``, ``measured`` nll, held-out ``predicted`` nll, ensemble
  ``predicted_std``, the ``fold`` each row was scored in and the ``member`` that scored it (-1: an
  assessment-only network);
- ``fit.png``: held-out predicted vs measured;
- ``history.csv``: member, epoch, train_loss, val_loss (standardized units).

Example:
    >>> surrogate = train_surrogate("runs/default/dataset.zarr", "runs/default/surrogate", members=3)  # doctest: +SKIP
    >>> surrogate.metadata["metrics"]["overall"]["spearman"]  # doctest: +SKIP
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

from layershap.core.errors import LayershapError
from layershap.oracle.store import DatasetStore

from .callbacks import BestWeights, EpochBar
from .checkpoint import TARGETS, Surrogate, check_save_target
from .data import MaskDataModule, folds_for
from .metrics import SPLIT_PROTOCOL, fit_metrics
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
        >>> train_surrogate("data.zarr", "surrogate", members=3, seed=0).metadata["metrics"]["overall"]["r2"]  # doctest: +SKIP
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

    Nested cross-validation, so the reported metrics rest on rows no network used for any decision: network
    ``k`` is *scored* on fold ``k``, *early-stops* (epoch count and best-epoch weights) on fold ``k + 1 mod
    folds`` and *fits* on the other folds (:meth:`MaskDataModule.hold_out`). Members are networks
    ``0 .. members-1``; every fold no member is scored on (``members < folds``) gets one more network, fitted
    the same way and used only for its fold's held-out predictions (``training.assessment_runs``; not
    saved). So every row of a stratum with at least 3 rows is predicted exactly once, by a network that never
    fitted or early-stopped on it, and ``metadata["metrics"]`` (:func:`~layershap.surrogate.metrics.fit_metrics`,
    ``{"overall": {...}, "by_removed": [...]}``) are those predictions' metrics.

    Why this split and not a test fold no member ever sees: the final members still learn from every row
    (each fits on all folds but two; the ensemble fits on every row), where a fixed test fold would be lost
    to the surrogate; the cost is one fold per member for early stopping. Only the target's standardization
    (mean and std of log(nll) over all rows, two numbers) and the fold assignment (by removed-layer count, no
    nll) are shared by all networks.

    Example:
        >>> dm = MaskDataModule(masks, nll, folds=5, seed=0)  # doctest: +SKIP
        >>> train_ensemble(dm, "out", members=3, hidden=64).metadata["metrics"]["overall"]["spearman"]  # doctest: +SKIP
    """
    if members < 1:
        raise LayershapError(f"--members must be >= 1, got {members}")
    if max_epochs < 1 or patience < 1 or hidden < 1 or depth < 1:
        raise LayershapError("max_epochs, patience, hidden and depth must all be >= 1")
    for fold in range(dm.folds):  # every fold is scored once and is some network's early-stopping fold
        if not (dm.fold_of == fold).any():
            raise LayershapError(
                f"only {len(dm.nll)} measured masks: cross-validation fold {fold} of {dm.folds} gets no row, so "
                f"a network has nothing to validate on; measure more masks (e.g. `layershap oracle --masks "
                f"stratified --n-masks 64`) or train fewer --members"
            )
    out = check_save_target(out_dir)
    started = time.perf_counter()
    all_seeds = member_seeds(seed, max(members, dm.folds))  # a prefix: members get member_seeds(seed, members)
    seeds = all_seeds[:members]
    scored = {i % dm.folds for i in range(members)}
    networks = [(i, i % dm.folds) for i in range(members)] + [
        (f, f) for f in range(dm.folds) if f not in scored]  # (seed index, scored fold)
    nets, runs, assessment, history = [], [], [], []
    target = TARGETS[dm.utility]
    predicted = np.full(len(dm.nll), np.nan)
    scored_by = np.full(len(dm.nll), -2, dtype=np.int64)  # member index, -1 = an assessment network
    for k, (s, fold) in enumerate(networks):
        member = k < members
        dm.hold_out(fold)
        label = f"member {k + 1}/{members}" if member else f"assessment network for fold {fold}"
        net, run, hist = fit_member(
            dm, all_seeds[s], hidden=hidden, depth=depth, max_epochs=max_epochs, patience=patience, lr=lr,
            weight_decay=weight_decay, progress=progress, label=label,
        )
        run.update(fold=dm.fold, stop_fold=dm.stop_fold)
        rows = dm.test_index
        if (scored_by[rows] != -2).any():
            raise RuntimeError("a held-out row was scored twice")  # folds are distinct by construction
        one = Surrogate([net], {"n_layers": dm.n_layers, "target": target, "target_mean": dm.target_mean,
                                "target_std": dm.target_std, "removed_counts": dm.removed_counts})
        predicted[rows] = one.predict_nll(dm.masks[rows])
        scored_by[rows] = k if member else -1
        if member:
            nets.append(net)
            runs.append(run)
            history += [(k, *row) for row in hist]
        else:
            assessment.append(run)
    provenance = dict(provenance or {})
    held = np.flatnonzero(scored_by != -2)
    metadata = {
        "model_id": provenance.pop("model_id", None), "model_hash": provenance.pop("model_hash", None),
        "n_layers": dm.n_layers, "dataset_hash": provenance.pop("dataset_hash", None),
        "target": target, "utility": dm.utility, "target_mean": dm.target_mean, "target_std": dm.target_std,
        "removed_counts": dm.removed_counts,
        **provenance,
        "split": {"rows": len(dm.nll), "folds": dm.folds, "seed": dm.seed, "stratified_by": "removed-layer count",
                  "held_out": len(held), "protocol": SPLIT_PROTOCOL,
                  "rule": "network k is scored on fold k, early-stops on fold k+1 mod folds and fits on the "
                          "others; members are networks 0..members-1, folds no member is scored on get an "
                          "assessment-only network"},
        "training": {"seed": seed, "members": members, "member_seeds": seeds, "max_epochs": max_epochs,
                     "patience": patience, "lr": lr, "weight_decay": weight_decay, "batch_size": dm.batch_size,
                     "loss": f"mse on standardized log({dm.utility}{' + offset' * (dm.offset > 0)}), weight "
                             "1/(1 + removed layers)",
                     "optimizer": "adam", "runs": runs, "assessment_runs": assessment},
    }
    surrogate = Surrogate(nets, metadata)
    val_masks, val_nll, val_pred = dm.masks[held], dm.nll[held], predicted[held]
    spread = surrogate.predict_std(val_masks)
    metadata["metrics"] = fit_metrics(val_masks, val_nll, val_pred)
    metadata["training"]["seconds"] = round(time.perf_counter() - started, 3)
    lines = ["member,epoch,train_loss,val_loss"] + [f"{m},{e},{t!r},{v!r}" for m, e, t, v in history]

    def beside(folder: Path) -> None:  # written into the same atomic save as the members
        np.savez(folder / VALIDATION_FILE, masks=val_masks, measured=val_nll, predicted=val_pred,
                 predicted_std=spread, fold=dm.fold_of[held], member=scored_by[held])
        plot_fit(val_nll, val_pred, (~val_masks).sum(axis=1), folder / "fit.png", predicted_std=spread,
                 title=f"surrogate, held out on {len(val_nll)} masks (nested CV; {members} "
                       f"member{'s' * (members > 1)})", utility=dm.utility)
        (folder / "history.csv").write_text("\n".join(lines) + "\n")

    surrogate.save(out, extra=beside)
    return surrogate


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
        >>> net, run, history = fit_member(dm, seed=1, hidden=64, max_epochs=100, progress=False)  # doctest: +SKIP
    """
    with _quiet_lightning():
        L.seed_everything(seed, workers=True, verbose=False)
        module = MaskMLP(dm.n_layers, hidden=hidden, depth=depth, lr=lr, weight_decay=weight_decay,
                         anchor=dm.full_target)
        best = BestWeights()
        callbacks: list[Callback] = [EarlyStopping(monitor="val_loss", mode="min", patience=patience), best]
        if progress:
            callbacks.append(EpochBar(max_epochs, label))
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
