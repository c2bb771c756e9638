"""``layershap train STORE.zarr --out DIR``: fit the MLP surrogate ensemble on a dataset store and print its
held-out R², Spearman and Kendall τ, overall and per removed-layer count.

Example:
    $ layershap train runs/default/dataset.zarr --out runs/default/surrogate --members 3
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from layershap.surrogate.network import DEFAULT_HIDDEN

    parser.add_argument("store", help="dataset store (zarr) written by `layershap oracle`")
    parser.add_argument("--out", required=True, help="folder for the surrogate (weights, metadata.json, fit.png)")
    parser.add_argument("--members", type=int, default=1, help="ensemble size; spread = uncertainty (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the members (default 0)")
    parser.add_argument("--max-epochs", type=int, default=500, help="epoch limit per member (default 500)")
    parser.add_argument("--patience", type=int, default=50, help="early-stopping patience in epochs (default 50)")
    parser.add_argument("--hidden", type=int, default=DEFAULT_HIDDEN, help=f"hidden units per layer (default {DEFAULT_HIDDEN})")
    parser.add_argument("--depth", type=int, default=2, help="hidden layers (default 2)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size (default 64)")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="share of masks held out for validation, per removed-count stratum (default 0.2)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run(args: argparse.Namespace) -> int:
    from .metrics import format_metrics_table
    from .train import train_surrogate

    out = Path(args.out)
    metrics = train_surrogate(
        args.store, out, members=args.members, seed=args.seed, hidden=args.hidden, max_epochs=args.max_epochs,
        val_fraction=args.val_fraction, progress=not args.no_progress, depth=args.depth,
        patience=args.patience, lr=args.lr, batch_size=args.batch_size,
    )
    print()
    print(f"surrogate validation on held-out masks (nll in nats; {args.members} member(s), seed {args.seed}):")
    print(format_metrics_table(metrics))
    print()
    print(f"surrogate written to {out}/ : metadata.json, member_*.pt, validation.npz, history.csv")
    print(f"predicted vs measured plot: {out / 'fit.png'}")
    return 0
