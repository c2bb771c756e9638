"""Which weights of a linear layer to prune: Wanda and magnitude scores, unstructured and N:M selection.

Wanda scores weight ``W[r, c]`` by ``|W[r, c]| * ||X[:, c]||_2`` (``X``: the layer's calibration inputs, one
row per token) and prunes the lowest scores of every output row (comparison group = row). Magnitude pruning
scores ``|W[r, c]|`` and prunes the lowest of the whole matrix. ``N:M`` prunes the ``N`` lowest of every ``M``
consecutive inputs of a row (``2:4`` keeps 2 of every 4 weights).

Counts are whole weights: :func:`apportion` splits a total over parts by largest remainders, so that a matrix
loses exactly its share and rows differ by at most one pruned weight.

Example:
    >>> metric = wanda_metric(linear.weight, input_sq_norms)          # float32[out, in]  # doctest: +SKIP
    >>> pruned = select_unstructured(metric, count=1200, per_row=True)  # bool[out, in], True = set to 0  # doctest: +SKIP
    >>> linear.weight.data[pruned] = 0  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import torch

from layershap.core.errors import LayershapError

METHODS = ("wanda", "magnitude")


def apportion(exact: np.ndarray, total: int) -> np.ndarray:
    """Whole numbers ``int64[k]`` summing to ``total``, each ``floor(exact)`` or one more (largest remainders).

    Ties go to the earlier part. ``exact`` must sum to ``total`` within one unit per part.

    Example:
        >>> apportion(np.array([1.5, 1.5, 1.0]), 4)
        array([2, 1, 1])
    """
    exact = np.asarray(exact, dtype=np.float64)
    base = np.floor(exact).astype(np.int64)
    extra = int(total) - int(base.sum())
    if not 0 <= extra <= exact.size:
        raise ValueError(f"cannot apportion {total} over parts {exact.tolist()}")
    order = np.argsort(-(exact - base), kind="stable")
    base[order[:extra]] += 1
    return base


def wanda_metric(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda score ``|W| * sqrt(sum over tokens of x_c^2)`` as float32 ``[out, in]``.

    Example:
        >>> wanda_metric(torch.ones(2, 3), torch.tensor([1.0, 4.0, 9.0]))
        tensor([[1., 2., 3.],
                [1., 2., 3.]])
    """
    return weight.detach().abs().float() * input_sq_norms.float().sqrt()[None, :]


def magnitude_metric(weight: torch.Tensor) -> torch.Tensor:
    """Magnitude score ``|W|`` as float32 ``[out, in]``."""
    return weight.detach().abs().float()


def _lowest_per_row(metric: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``bool`` mask of the ``counts[r]`` lowest entries of every row ``r`` (exactly that many, ties broken
    arbitrarily); rows sharing a count are selected together with one partial sort (``topk``)."""
    pruned = torch.zeros(metric.shape, dtype=torch.bool, device=metric.device)
    for count in torch.unique(counts).tolist():
        if count == 0:
            continue
        rows = torch.nonzero(counts == count).reshape(-1)
        lowest = torch.topk(metric[rows], int(count), dim=1, largest=False, sorted=False).indices
        pruned[rows] = pruned[rows].scatter(1, lowest, True)
    return pruned


def select_unstructured(metric: torch.Tensor, count: int, per_row: bool) -> torch.Tensor:
    """``bool[out, in]``: the ``count`` lowest-scored weights (True = prune).

    ``per_row=True`` (Wanda): every row loses ``count // out`` weights, the first ``count % out`` rows one more.
    ``per_row=False`` (magnitude): the lowest ``count`` of the whole matrix.

    Example:
        >>> select_unstructured(torch.tensor([[3., 1., 2.], [1., 2., 3.]]), 2, per_row=True)
        tensor([[False,  True, False],
                [ True, False, False]])
    """
    rows, cols = metric.shape
    if not 0 <= count <= rows * cols:
        raise ValueError(f"cannot prune {count} of {rows * cols} weights")
    if per_row:
        counts = apportion(np.full(rows, count / rows), count)
        return _lowest_per_row(metric, torch.as_tensor(counts, device=metric.device))
    flat = metric.reshape(1, -1)
    return _lowest_per_row(flat, torch.tensor([count], device=metric.device)).reshape(rows, cols)


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``None`` for ``unstructured``; ``(n_pruned, M)`` for ``"N:M"``, which keeps ``N`` of every ``M`` weights.

    Example:
        >>> parse_pattern("2:4"), parse_pattern("unstructured")
        ((2, 4), None)
    """
    if pattern == "unstructured":
        return None
    kept, sep, group = pattern.partition(":")
    if not sep or not kept.isdigit() or not group.isdigit() or not 0 < int(kept) < int(group):
        raise LayershapError(
            f"--pattern {pattern!r} is not understood; use 'unstructured' or N:M with 0 < N < M, e.g. '2:4'"
        )
    return int(group) - int(kept), int(group)


def select_n_of_m(metric: torch.Tensor, n_pruned: int, m: int) -> torch.Tensor:
    """``bool[out, in]``: in every row, the ``n_pruned`` lowest of each ``m`` consecutive inputs (True = prune).

    Example:
        >>> select_n_of_m(torch.tensor([[4., 1., 3., 2.]]), 2, 4)
        tensor([[False,  True, False,  True]])
    """
    rows, cols = metric.shape
    if cols % m:
        raise LayershapError(
            f"an N:M pattern with M={m} needs input sizes divisible by {m}; a linear layer has {cols} inputs. "
            "Use --pattern unstructured"
        )
    groups = metric.reshape(rows * cols // m, m)
    counts = torch.full((groups.shape[0],), n_pruned, device=metric.device)
    return _lowest_per_row(groups, counts).reshape(rows, cols)
