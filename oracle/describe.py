"""Describe a dataset store for people: attributes, row count, best and worst masks, rows per stratum.

Example:
    >>> print(describe_store(DatasetStore.open("runs/default/dataset.zarr"), top=5))  # doctest: +SKIP
    >>> perplexity_text(2.5)
    '12.18'
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from layershap.core.masks import removed_text

from .store import DatasetStore


def perplexity_text(nll: float) -> str:
    """exp(nll) formatted for people (``inf`` past float64 range).

    Example:
        >>> perplexity_text(math.log(17.0))
        '17'
    """
    return f"{math.exp(nll):.4g}" if nll < 700 else "inf"


def layer_types_text(types: list[str]) -> str:
    """``3 sliding_attention, 1 full_attention (layers 3)``: the commonest type counted, others located."""
    counts = Counter(types).most_common()
    if not counts:
        return "none"
    parts = [f"{counts[0][1]} {counts[0][0]}"]
    for name, count in counts[1:]:
        where = ", ".join(str(i) for i, t in enumerate(types) if t == name)
        parts.append(f"{count} {name} (layers {where})")
    return ", ".join(parts)


def describe_store(store: DatasetStore, top: int = 5) -> str:
    """The text ``layershap info`` prints for a :class:`DatasetStore`."""
    attrs = store.attrs
    lines = [f"dataset store {store.path}"]
    for key in sorted(attrs):
        if key == "n_rows":
            continue
        value = layer_types_text(attrs[key]) if key == "layer_types" else attrs[key]
        if key == "players":  # the sublayer game's entry names, in mask order
            value = f"{len(value)}: {', '.join(value[:4])}, ..., {value[-1]}" if len(value) > 5 else ", ".join(value)
        lines.append(f"  {key:16s} {value}")
    n = len(store)
    lines.append(f"rows: {n}")
    if n == 0:
        lines.append("no masks measured yet")
        return "\n".join(lines)
    masks, nll, seconds = store.masks, store.nll, store.seconds
    lines.append(f"measuring time: {seconds.sum():.1f} s in all, {seconds.mean():.3g} s per mask")
    order = np.argsort(nll, kind="stable")
    k = min(top, n)
    names, what = (store.players, "sublayers") if store.game == "sublayers" else (None, "layers")

    def gone(mask: np.ndarray) -> str:
        if names is None:
            return removed_text(mask)
        return ", ".join(names[i] for i in np.flatnonzero(~mask)) or "none"

    width = max(len(f"removed {what}"), *(len(gone(m)) for m in masks[order[:k]]),
                *(len(gone(m)) for m in masks[order[n - k:]]))
    header = f"  {f'removed {what}':{width}s}  {'nll':>9s}  {'perplexity':>11s}"

    def table(title: str, rows: np.ndarray) -> None:
        lines.append(title)
        lines.append(header)
        for i in rows:
            lines.append(f"  {gone(masks[i]):{width}s}  {nll[i]:9.4f}  {perplexity_text(nll[i]):>11s}")

    if k:
        table(f"best {k} masks (lowest nll):", order[:k])
        table(f"worst {k} masks (highest nll):", order[::-1][:k])
    removed = (~masks).sum(axis=1)
    lines.append("rows per removed-layer count:" if names is None else "rows per removed-sublayer count:")
    lines.append(f"  {'removed':>7s}  {'rows':>6s}  {'median nll':>10s}")
    for r in np.unique(removed):
        sel = nll[removed == r]
        lines.append(f"  {int(r):7d}  {len(sel):6d}  {np.median(sel):10.4f}")
    return "\n".join(lines)
