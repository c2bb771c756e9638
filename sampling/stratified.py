"""Layer masks stratified by how many layers are removed, plus the full model and every leave-one-out mask.

A *stratum* ``r`` is the set of the C(n, r) masks with exactly ``r`` layers removed. Within a stratum masks
are drawn uniformly at random without replacement (seeded ``np.random.default_rng``).

Rules of :func:`stratified_masks`:

- The full model and all ``n`` leave-one-out masks come first (``include_loo=True``) and count toward
  ``n_masks``; they fill strata 0 and 1, so those strata receive no further sampled masks.
- The remaining budget is shared equally between the strata in ``removed``; a remainder goes to the strata
  with the fewest removed layers; a stratum never receives more masks than it has left (its surplus is
  redistributed to the others).
- No mask appears twice and none is in ``exclude`` (the masks a store already holds, for extending it).
  Masks in ``exclude`` are never returned, the full model and leave-one-out masks included, so with
  ``exclude`` every returned mask is new and ``n_masks`` counts new masks only.
- Sampled masks follow the fixed ones in random order, so any prefix of the result
  is itself roughly stratified (useful when a measurement run is interrupted).

Example:
    >>> masks = stratified_masks(18, 200, seed=0)          # bool[200, 18]; rows 0..18 = full + leave-one-out
    >>> int((~masks).sum(1).max())                          # at most ceil(18 / 2) = 9 layers removed
    9
    >>> more = stratified_masks(18, 100, seed=1, exclude=masks)   # 100 masks not measured yet
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from layershap.core.errors import LayershapError
from layershap.core.masks import check_masks

# A stratum with at most this many masks is enumerated; a larger one is sampled by rejection.
ENUMERATE_LIMIT = 200_000


def loo_masks(n: int) -> np.ndarray:
    """The full model, then each leave-one-out mask (layer ``i`` removed in row ``i + 1``): ``bool[n + 1, n]``.

    Example:
        >>> loo_masks(3).astype(int).tolist()
        [[1, 1, 1], [0, 1, 1], [1, 0, 1], [1, 1, 0]]
    """
    _check_n(n)
    return np.vstack([np.ones((1, n), dtype=bool), ~np.eye(n, dtype=bool)])


def default_removed_counts(n: int) -> list[int]:
    """The default strata: 1 .. ceil(n / 2) layers removed (the pruning range).

    Example:
        >>> default_removed_counts(5)
        [1, 2, 3]
    """
    _check_n(n)
    return list(range(1, math.ceil(n / 2) + 1))


def all_removed_counts(n: int) -> list[int]:
    """Every stratum 1 .. n (all coalition sizes except the full model), as exact Shapley values need.

    Example:
        >>> all_removed_counts(3)
        [1, 2, 3]
    """
    _check_n(n)
    return list(range(1, n + 1))


def stratified_masks(
    n: int,
    n_masks: int,
    seed: int,
    removed: Sequence[int] | None = None,
    include_loo: bool = True,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """``n_masks`` distinct masks ``bool[n_masks, n]``, stratified by the number of removed layers.

    Args:
        n: number of decoder layers.
        n_masks: number of masks returned (full model and leave-one-out included when ``include_loo``).
        seed: seed of ``np.random.default_rng``; same arguments -> same masks.
        removed: removed-layer counts of the strata; default 1 .. ceil(n / 2)
            (:func:`default_removed_counts`); :func:`all_removed_counts` covers every coalition size.
        include_loo: start with the full model and the n leave-one-out masks.
        exclude: masks never to return, e.g. ``store.masks`` when extending a store.

    Raises:
        LayershapError: bad arguments, or more masks asked for than the strata hold.

    Example:
        >>> m = stratified_masks(10, 60, seed=0, removed=range(1, 11))
        >>> len({row.tobytes() for row in m})
        60
    """
    _check_n(n)
    if isinstance(n_masks, bool) or not isinstance(n_masks, (int, np.integer)) or n_masks < 0:
        raise LayershapError(f"n_masks must be a non-negative integer, got {n_masks!r}")
    strata = _check_strata(n, removed)
    excluded = _keys(check_masks(exclude, n)) if exclude is not None and len(exclude) else set()
    rng = np.random.default_rng(seed)

    fixed = [row for row in loo_masks(n) if _key(row) not in excluded] if include_loo else []
    fixed_arr = np.array(fixed, dtype=bool).reshape(-1, n)
    budget = int(n_masks) - len(fixed)
    if budget < 0:
        raise LayershapError(
            f"n_masks={n_masks} is smaller than the {len(fixed)} full-model and leave-one-out masks that "
            f"are always included; ask for at least {len(fixed)} masks or pass include_loo=False"
        )
    taken = _by_stratum(excluded | _keys(fixed_arr), n)  # removed count -> keys no draw may return
    caps = {r: math.comb(n, r) - len(taken.get(r, ())) for r in strata}
    if budget > sum(caps.values()):
        also = " (plus the full-model and leave-one-out masks)" if fixed else ""
        have = f", leaving out the {len(excluded)} excluded masks" if excluded else ""
        raise LayershapError(
            f"asked for {n_masks} masks but only {sum(caps.values()) + len(fixed)} distinct masks with "
            f"{_describe(strata)} layers removed{also} are available{have}; lower n_masks or add strata "
            f"(removed-layer counts)"
        )
    counts = _allocate(caps, budget)

    units: list[np.ndarray] = []  # sampled rows, one mask each
    for r in strata:
        units += list(_sample_into(n, r, counts[r], rng, taken)[:, None, :])
    sampled = [units[i] for i in rng.permutation(len(units))]
    out = np.concatenate([fixed_arr] + [u.reshape(-1, n) for u in sampled], axis=0)
    assert out.shape == (n_masks, n), (out.shape, n_masks)
    return out


def _allocate(caps: dict[int, int], budget: int) -> dict[int, int]:
    """Equal share per stratum, capped by what each has left; the remainder goes to the fewest-removed strata.

    Example:
        >>> _allocate({1: 0, 2: 45, 3: 120}, 100)
        {1: 0, 2: 45, 3: 55}
    """
    lo, hi = 0, budget + 1  # largest per-stratum level whose total fits the budget
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if sum(min(c, mid) for c in caps.values()) <= budget else (lo, mid)
    counts = {r: min(c, lo) for r, c in caps.items()}
    left = budget - sum(counts.values())
    for r in sorted(caps):
        if left == 0:
            break
        if caps[r] > counts[r]:
            counts[r] += 1
            left -= 1
    assert left == 0, "budget exceeds the strata's capacity"
    return counts


def _sample_into(n: int, r: int, k: int, rng: np.random.Generator, taken: dict[int, set[bytes]]) -> np.ndarray:
    """:func:`_sample_stratum` avoiding ``taken[r]``, then recording the draws there."""
    t = taken.setdefault(r, set())
    masks = _sample_stratum(n, r, k, rng, t)
    t.update(_key_list(masks))
    return masks


# --- sampling within one stratum ------------------------------------------------------------------------


def _sample_stratum(n: int, r: int, k: int, rng: np.random.Generator, avoid: set[bytes]) -> np.ndarray:
    """``k`` distinct masks with exactly ``r`` layers removed, none in ``avoid``, uniformly at random."""
    if k == 0:
        return np.zeros((0, n), dtype=bool)
    total = math.comb(n, r)
    if total <= ENUMERATE_LIMIT:
        combos = np.array(list(itertools.combinations(range(n), r)), dtype=np.intp).reshape(total, r)
        cand = np.ones((total, n), dtype=bool)
        cand[np.arange(total)[:, None], combos] = False
        if avoid:
            cand = cand[[key not in avoid for key in _key_list(cand)]]
        return cand[np.sort(rng.choice(len(cand), size=k, replace=False))]
    chosen: dict[bytes, np.ndarray] = {}
    while len(chosen) < k:
        batch = max(64, 2 * (k - len(chosen)))
        pos = np.argsort(rng.random((batch, n)), axis=1)[:, :r]
        cand = np.ones((batch, n), dtype=bool)
        cand[np.arange(batch)[:, None], pos] = False
        for key, row in zip(_key_list(cand), cand):
            if key not in avoid and key not in chosen:
                chosen[key] = row
                if len(chosen) == k:
                    break
    return np.array(list(chosen.values()), dtype=bool).reshape(k, n)


# --- keys and checks ------------------------------------------------------------------------------------


def _key(row: np.ndarray) -> bytes:
    return np.packbits(row).tobytes()


def _key_list(masks: np.ndarray) -> list[bytes]:
    """One hashable key per row (packed bits), vectorised."""
    if len(masks) == 0:
        return []
    packed = np.ascontiguousarray(np.packbits(masks.reshape(len(masks), -1), axis=1))
    width, raw = packed.shape[1], packed.tobytes()
    return [raw[i : i + width] for i in range(0, len(raw), width)] if width else [b""] * len(masks)


def _keys(masks: np.ndarray) -> set[bytes]:
    return set(_key_list(masks))


def _by_stratum(keys: set[bytes], n: int) -> dict[int, set[bytes]]:
    """Group keys by their removed-layer count (vectorised)."""
    if not keys:
        return {}
    ordered = list(keys)
    bits = np.unpackbits(np.frombuffer(b"".join(ordered), dtype=np.uint8).reshape(len(ordered), -1), axis=1)
    removed = n - bits[:, :n].sum(axis=1)
    out: dict[int, set[bytes]] = {}
    for key, r in zip(ordered, removed.tolist()):
        out.setdefault(r, set()).add(key)
    return out


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise LayershapError(f"the number of layers must be a positive integer, got {n!r}")


def _check_strata(n: int, removed: Sequence[int] | None) -> list[int]:
    strata = default_removed_counts(n) if removed is None else [int(r) for r in removed]
    if not strata:
        raise LayershapError("removed (the strata's removed-layer counts) is empty; give at least one count")
    bad = [r for r in strata if not 0 <= r <= n]
    if bad:
        raise LayershapError(f"removed-layer counts {bad} are outside 0..{n} for a model with {n} layers")
    return sorted(set(strata))


def _describe(strata: list[int]) -> str:
    return ", ".join(map(str, strata))
