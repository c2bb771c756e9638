"""Which layer score to compute: Shapley value, Banzhaf value or a pruning-range semivalue, as per-size weights.

Every index here is a *semivalue*: for a game ``v`` on ``n`` players (layers),

    phi_i = sum over S ⊆ N \\ {i} of p_|S| · [v(S ∪ {i}) − v(S)],

with one weight ``p_s`` per coalition size ``s = |S|`` (0 ≤ s ≤ n−1). ``S`` is the set of layers *kept*.

* **Shapley**: ``p_s = s!(n−s−1)!/n!`` — marginal contributions averaged uniformly over sizes, then over
  subsets of each size.
* **Banzhaf**: ``p_s = 1/2^(n−1)`` — every subset of the other layers equally likely.
* **Pruning-range semivalue** ``semivalue[A:B]`` over removed-layer counts ``1 ≤ A ≤ B ≤ n``: the pruned model
  *without* layer ``i`` (that is, ``S``) has ``r = n − |S|`` layers removed. The marginal contributions of ``i``
  are averaged uniformly over ``r`` in ``[A, B]`` and uniformly over the subsets ``S`` of each size:
  ``p_s = 1/((B−A+1)·C(n−1, s))`` when ``n−s`` lies in ``[A, B]``, else 0. ``semivalue[1:n]`` is the Shapley
  value. It uses models with ``A−1 … B`` layers removed (``S ∪ {i}`` has ``r−1`` removed), which is what a
  surrogate must have seen in training for the score to be trustworthy (:func:`uncovered_counts`).
* **Index for K** ``k[K]``: the pruning-range semivalue over exactly ``r = K``: each layer's marginal
  contribution when it is the K-th layer removed, averaged uniformly over the sets of K−1 other removed layers
  (uses models with K−1 and K layers removed). It answers "how much does layer i matter once K−1 others are
  gone", the regime a K-layer depth pruning lives in; ``k[1]`` is leave-one-out.

Which index to compute for a surrogate (:func:`choose_index`): a surrogate is trustworthy only on the
removed-layer counts it was trained on *and* validated on. Callers pass the counts in the training data and
``excluded``, the counts among them whose held-out metrics do not validate the surrogate, each with the reason
(:func:`layershap.surrogate.metrics.not_validated` states the rule). ``auto`` picks the pruning-range semivalue
over ``1..R`` removed layers, ``R`` the largest count such that ``0..R`` all occur in the training data and none
is excluded, or the Shapley value when every count ``0..n`` qualifies. An index that weights counts the data
lack, or excluded counts, warns, naming them and why (:func:`coverage_report`). (Over 300 lines: the indices and
the rules choosing one for a surrogate are one contract that the CLI, the pipeline and the service import from
here.)

Example:
    >>> Index("semivalue", 1, 6).weights(18).shape      # float64[18], p_s for s = 0..17
    (18,)
    >>> default_index([0, 1, 2, 3, 4, 5, 6, 9], 18).name
    'semivalue[1:6]'
    >>> default_index(range(10), 18, excluded={8: "Spearman 0.20 < 0.5 on 9 held-out rows"}).name
    'semivalue[1:7]'
    >>> choose_index("auto", None, [0, 1, 2, 3], 8).name
    'semivalue[1:3]'
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from layershap.core.errors import LayershapError

INDEX_KINDS = ("shapley", "banzhaf", "semivalue", "k")
INDEX_CHOICES = ("auto", *INDEX_KINDS)  # what a user may ask for


def shapley_weights(n: int) -> np.ndarray:
    """Shapley weights ``p_s = s!(n−s−1)!/n! = 1/(n·C(n−1, s))`` for ``s = 0..n−1``: float64[n]."""
    _check_n(n)
    return np.array([1.0 / (n * math.comb(n - 1, s)) for s in range(n)], dtype=np.float64)


def banzhaf_weights(n: int) -> np.ndarray:
    """Banzhaf weights ``p_s = 1/2^(n−1)`` for ``s = 0..n−1``: float64[n]."""
    _check_n(n)
    return np.full(n, 0.5 ** (n - 1), dtype=np.float64)


def range_weights(n: int, low: int, high: int) -> np.ndarray:
    """Pruning-range semivalue weights over removed-layer counts ``r = n − s`` in ``[low, high]``: float64[n].

    ``p_s = 1/((high−low+1)·C(n−1, s))`` if ``low ≤ n − s ≤ high`` else 0; ``[1, n]`` gives Shapley weights.
    """
    _check_n(n)
    _check_range(n, low, high)
    p = np.zeros(n, dtype=np.float64)
    for r in range(low, high + 1):
        s = n - r
        p[s] = 1.0 / ((high - low + 1) * math.comb(n - 1, s))
    return p


def shapley_interaction_weights(n: int) -> np.ndarray:
    """Shapley interaction weights ``w_s = s!(n−s−2)!/(n−1)!`` for ``s = 0..n−2``: float64[n−1] (n ≥ 2)."""
    if n < 2:
        raise LayershapError(f"pairwise interactions need at least 2 layers; got n = {n}")
    return np.array([1.0 / ((n - 1) * math.comb(n - 2, s)) for s in range(n - 1)], dtype=np.float64)


@dataclass(frozen=True)
class Index:
    """A semivalue by name: ``Index("shapley")``, ``Index("banzhaf")`` or ``Index("semivalue", low, high)``.

    Example:
        >>> Index("semivalue", 1, 4).weights(8)[4:]     # only s = 4..7 (r = 4..1 removed) carry weight
        array([0.00714286, 0.01190476, 0.03571429, 0.25      ])
    """

    kind: str
    low: int | None = None
    high: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise LayershapError(f"unknown index {self.kind!r}; use one of {', '.join(INDEX_KINDS)}")
        if self.kind == "semivalue":
            if self.low is None or self.high is None:
                raise LayershapError("the pruning-range semivalue needs a removed-layer range A:B (--sizes A:B)")
            if not 1 <= self.low <= self.high:
                raise LayershapError(
                    f"removed-layer range {self.low}:{self.high} is invalid; need 1 <= A <= B (e.g. --sizes 1:6)"
                )
        elif self.kind == "k":
            if self.low is None or self.low < 1 or self.high not in (None, self.low):
                raise LayershapError("the index for K needs one removed-layer count K >= 1 (--index k --sizes K)")
            object.__setattr__(self, "high", self.low)
        elif self.low is not None or self.high is not None:
            raise LayershapError(f"{self.kind} takes no removed-layer range; use --index semivalue --sizes A:B")

    @property
    def name(self) -> str:
        """``shapley``, ``banzhaf`` or ``semivalue[A:B]`` (the name written into score files)."""
        if self.kind == "k":
            return f"k[{self.low}]"
        return f"semivalue[{self.low}:{self.high}]" if self.kind == "semivalue" else self.kind

    def validate(self, n: int) -> None:
        """Raise :class:`LayershapError` if the index does not fit a game of ``n`` players."""
        _check_n(n)
        if self.kind in ("semivalue", "k"):
            _check_range(n, self.low, self.high)

    def weights(self, n: int) -> np.ndarray:
        """Per-size weights ``p_s``, ``s = 0..n−1``: float64[n]."""
        if self.kind == "shapley":
            return shapley_weights(n)
        if self.kind == "banzhaf":
            return banzhaf_weights(n)
        return range_weights(n, self.low, self.high)

    def is_shapley(self, n: int) -> bool:
        """True when the weights are the Shapley weights (also ``semivalue[1:n]``): efficiency must hold."""
        return self.kind == "shapley" or (self.kind == "semivalue" and (self.low, self.high) == (1, n))

    def removed_counts_used(self, n: int) -> list[int]:
        """Removed-layer counts of the masks this index evaluates with nonzero weight (0 = full model)."""
        self.validate(n)
        if self.kind in ("semivalue", "k"):
            return list(range(self.low - 1, self.high + 1))
        return list(range(n + 1))

    def describe(self, n: int) -> str:
        """One sentence saying what the index averages."""
        if self.kind == "shapley":
            return "Shapley value: marginal contributions averaged over all coalition sizes (efficient)"
        if self.kind == "banzhaf":
            return "Banzhaf value: marginal contributions averaged over all subsets of the other layers"
        if self.kind == "k":
            return (f"index for K = {self.low}: each layer's marginal contribution with {self.low - 1} other layers "
                    f"already removed, averaged over those sets of {self.low - 1} (of {n} layers)")
        extra = " (equals the Shapley value)" if self.is_shapley(n) else ""
        return (
            f"pruning-range semivalue: marginal contributions averaged uniformly over {self.low}..{self.high} "
            f"removed layers (of {n}), then over the subsets of each size{extra}"
        )


def parse_sizes(text: str) -> tuple[int, int]:
    """Parse a removed-layer range ``A:B`` (or a single ``A``) into ``(A, B)``."""
    m = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d+)\s*)?", text)
    if m is None:
        raise LayershapError(f"cannot read --sizes {text!r}; give removed-layer counts as A:B, e.g. --sizes 1:6")
    low = int(m.group(1))
    high = int(m.group(2)) if m.group(2) is not None else low
    return low, high


def covered_prefix(removed_counts: Iterable[int]) -> int:
    """Largest ``R`` such that every removed-layer count ``0..R`` is present; −1 if 0 is missing."""
    present = {int(r) for r in removed_counts}
    r = -1
    while r + 1 in present:
        r += 1
    return r


def trusted_counts(removed_counts: Iterable[int], excluded: Mapping[int, str] | None = None) -> list[int]:
    """The counts of ``removed_counts`` not in ``excluded`` (sorted).

    Example:
        >>> trusted_counts([0, 1, 2, 3], {2: "3 held-out rows < 5"})
        [0, 1, 3]
    """
    skip = {int(r) for r in (excluded or {})}
    return sorted({int(r) for r in removed_counts} - skip)


def default_index(removed_counts: Iterable[int], n: int, excluded: Mapping[int, str] | None = None) -> Index:
    """The index a surrogate's training data support: Shapley if counts ``0..n`` are all present and none is
    ``excluded`` (count -> why its held-out metrics do not validate it), else ``semivalue[1:R]`` with ``R`` the
    largest count such that ``0..R`` all qualify. When the data hold the full model and single-layer removals
    but the metrics validate no count from 1 on, ``semivalue[1:1]`` (leave-one-out on the surrogate, the least
    extrapolation there is); :func:`coverage_report` then warns why.

    Example:
        >>> default_index([0, 1, 2, 3], 8, excluded={3: "2 held-out rows < 5"}).name
        'semivalue[1:2]'
        >>> default_index([0, 1, 2, 3], 8, excluded={1: "4 held-out rows < 5"}).name
        'semivalue[1:1]'
    """
    counts = sorted({int(r) for r in removed_counts})
    r_max = covered_prefix(trusted_counts(counts, excluded))
    if r_max >= n:
        return Index("shapley")
    if r_max < 1:
        if covered_prefix(counts) >= 1 and 0 not in (excluded or {}):
            return Index("semivalue", 1, 1)
        why = "; ".join(f"{r} removed: {excluded[r]}" for r in (0, 1) if excluded and r in excluded)
        raise LayershapError(
            f"the surrogate's training data cover removed-layer counts {counts}"
            + (f", but its held-out metrics do not validate it there ({why})" if why else
               ", which do not include both the full model (0) and single-layer removals (1)")
            + ", so no pruning-range semivalue is supported by data; measure more masks (full model and "
            "leave-one-out included) and retrain, or force an index with --index shapley / --sizes A:B"
        )
    return Index("semivalue", 1, r_max)


def uncovered_counts(index: Index, removed_counts: Iterable[int], n: int) -> list[int]:
    """Removed-layer counts the index weights that the surrogate's training data do not contain."""
    present = {int(r) for r in removed_counts}
    return [r for r in index.removed_counts_used(n) if r not in present]


def choose_index(index: str, sizes: str | None, removed_counts: list[int] | None, n: int,
                 excluded: Mapping[int, str] | None = None) -> Index:
    """The :class:`Index` for ``--index`` (one of :data:`INDEX_CHOICES`) and ``--sizes A:B``, given the
    surrogate's training removed counts (None = unknown: warns and takes the Shapley value) and the
    ``excluded`` counts its held-out metrics do not validate (see :func:`default_index`).

    Example:
        >>> choose_index("auto", None, [0, 1, 2, 3], 8).name
        'semivalue[1:3]'
    """
    if index == "k":
        if sizes is None:
            raise LayershapError("--index k needs the number of removed layers K: --index k --sizes K")
        low, high = parse_sizes(sizes)
        if low != high:
            raise LayershapError(f"--index k takes one removed-layer count K (--sizes K), not a range {sizes!r}")
        chosen = Index("k", low)
    elif sizes is not None:
        if index not in ("auto", "semivalue"):
            raise LayershapError(f"--sizes sets the pruning-range semivalue; it cannot be combined with --index {index}")
        low, high = parse_sizes(sizes)
        chosen = Index("semivalue", low, high)
    elif index == "auto":
        if removed_counts is None:
            warnings.warn("the surrogate's metadata list no removed_counts, so its coverage is unknown; "
                          "computing the Shapley value", stacklevel=2)
            chosen = Index("shapley")
        else:
            chosen = default_index(removed_counts, n, excluded)
    elif index not in INDEX_CHOICES:
        raise LayershapError(f"unknown --index {index!r}; use one of {', '.join(INDEX_CHOICES)}")
    elif index == "semivalue":  # auto's range, written as a semivalue even when it is the whole 1..n
        auto = default_index(removed_counts or [], n, excluded)
        chosen = Index("semivalue", 1, n) if auto.kind == "shapley" else auto
    else:
        chosen = Index(index)
    chosen.validate(n)
    return chosen


def coverage_report(chosen: Index, removed_counts: list[int] | None, n: int,
                    excluded: Mapping[int, str] | None = None) -> dict:
    """Removed-layer counts in the data, weighted by ``chosen``, uncovered (weighted, absent from the data) and
    not validated (in the data, ``excluded``: each with why); warns when weighted counts are either.

    ``not_validated`` lists every excluded count of the data (weighted or not, so a report says why ``auto``
    stopped where it did); ``None`` when validation is unknown (``excluded`` None).

    Example:
        >>> coverage_report(Index("semivalue", 1, 3), [0, 1, 2, 3], 8)["uncovered"]
        []
    """
    weighted = chosen.removed_counts_used(n)
    if removed_counts is None:
        return {"removed_counts_in_data": None, "removed_counts_weighted": weighted, "uncovered": None,
                "not_validated": None}
    missing = uncovered_counts(chosen, removed_counts, n)
    if missing:
        warnings.warn(
            f"{chosen.name} weights models with {ranges_text(missing)} layers removed, which the surrogate never "
            f"saw in training (its data cover {ranges_text(sorted(removed_counts))} removed); its scores rest on "
            "extrapolation there. Use --index auto for the range the data support, or measure more masks "
            "(all-sizes strata) and retrain.",
            UserWarning,
            stacklevel=2,
        )
    present = {int(r) for r in removed_counts}
    bad = {int(r): why for r, why in (excluded or {}).items() if int(r) in present}
    weighted_bad = [r for r in weighted if r in bad]
    if weighted_bad:
        warnings.warn(
            f"{chosen.name} weights models with {ranges_text(weighted_bad)} layers removed, where the surrogate's "
            "held-out metrics do not validate it (" + "; ".join(f"{r}: {bad[r]}" for r in weighted_bad) + "); "
            "its scores rest on unvalidated predictions there. Use --index auto for the validated range, or "
            "measure more masks of those sizes and retrain.",
            UserWarning,
            stacklevel=2,
        )
    return {"removed_counts_in_data": sorted(present), "removed_counts_weighted": weighted, "uncovered": missing,
            "not_validated": None if excluded is None else [{"removed": r, "why": bad[r]} for r in sorted(bad)]}


def ranges_text(values: list[int]) -> str:
    """Counts as ranges.

    Example:
        >>> ranges_text([1, 2, 3, 7, 9, 10])
        '1-3, 7, 9-10'
    """
    parts, start, prev = [], None, None
    for v in values:
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = v
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ", ".join(parts)


def _check_n(n: int) -> None:
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise LayershapError(f"the number of layers must be a positive integer; got {n!r}")


def _check_range(n: int, low: int, high: int) -> None:
    if not 1 <= low <= high <= n:
        raise LayershapError(
            f"removed-layer range {low}:{high} is outside 1..{n} for a {n}-layer model; "
            f"give --sizes A:B with 1 <= A <= B <= {n}"
        )
