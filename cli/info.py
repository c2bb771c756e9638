"""``layershap info STORE``: describe a dataset store — attributes, row count, best and worst masks, rows per
removed-layer count.

Example:
    $ layershap info runs/gemma-3-270m/dataset.zarr --top 3
"""

from __future__ import annotations

from .options import non_negative


def info(store: str, top: int = 5) -> int:
    """Describe a dataset store: attributes, rows, best and worst masks, rows per removed-layer count.

    Args:
        store: dataset store (zarr) written by `layershap oracle` or `layershap run`.
        top: how many best and worst masks to list.
    """
    from layershap.oracle.describe import describe_store
    from layershap.oracle.store import DatasetStore

    non_negative("top", top)
    print(describe_store(DatasetStore.open(store), top=top))
    return 0
