"""``layershap train STORE --out DIR``: fit the MLP surrogate ensemble on a dataset store and print its
held-out R², Spearman and Kendall τ (nested cross-validation), overall and per removed-layer count, with the
counts they validate.

Example:
    $ layershap train runs/default/dataset.zarr --out runs/default/surrogate --members 8
"""

from __future__ import annotations

from .options import fraction, non_negative, positive, positive_float


def train(
    store: str,
    out: str,
    members: int = 8,
    seed: int = 0,
    max_epochs: int = 500,
    patience: int = 50,
    hidden: int = 64,
    depth: int = 2,
    lr: float = 1e-3,
    batch_size: int = 64,
    val_fraction: float = 0.2,
    progress: bool = True,
) -> int:
    """Train the MLP surrogate ensemble on a dataset store.

    Args:
        store: dataset store (zarr) written by `layershap oracle` or `layershap run`.
        out: folder for the surrogate (weights, metadata.json, validation.npz, fit.png).
        members: ensemble size; member i is scored on fold i and early-stops on fold i+1; spread = uncertainty.
        seed: seed of the folds and the members.
        max_epochs: epoch limit per member.
        patience: early-stopping patience in epochs.
        hidden: hidden units per layer.
        depth: hidden layers.
        lr: Adam learning rate.
        batch_size: training batch size.
        val_fraction: share of masks per fold, per removed-count stratum (folds = max(members, 1/val_fraction, 3)).
        progress: show the progress bars.
    """
    from pathlib import Path

    from layershap.surrogate.metrics import training_report
    from layershap.surrogate.train import train_surrogate

    for name, value in (("members", members), ("max_epochs", max_epochs), ("patience", patience),
                        ("hidden", hidden), ("depth", depth), ("batch_size", batch_size)):
        positive(name, value)
    non_negative("seed", seed)
    positive_float("lr", lr)
    fraction("val_fraction", val_fraction)
    surrogate = train_surrogate(store, Path(out), members=members, seed=seed, hidden=hidden, max_epochs=max_epochs,
                                val_fraction=val_fraction, progress=progress, depth=depth, patience=patience,
                                lr=lr, batch_size=batch_size)
    print(training_report(surrogate.metadata["metrics"], members, seed, Path(out)))
    return 0
