"""The server's state: the registry (read only), loaded surrogates, and the cache of expensive answers.

Loaded surrogates are kept per entry id and reused while the entry's ``entry.json`` (the built-in entry's
``metadata.json``) is unchanged; an entry removed or replaced on disk is noticed on the next request. Expensive
answers (scores, interactions, removal sets, sparsities) are cached as bytes per (entry fingerprint, normalised
query) in a bounded LRU; concurrent identical queries compute once, the others wait for the same bytes, and at
most ``computations`` expensive computations run at a time (per server process).

Example:
    >>> svc = Service(Registry("/tmp/reg"), Limits())
    >>> entry, sur = svc.surrogate("gemma-3-270m")
    >>> svc.cached(entry, "scores", {"index": "shapley"}, lambda: {"x": 1})      # b'{"x":1}'  # doctest: +SKIP
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from layershap.surrogate.registry import ENTRY_FILE, Entry, Registry
from layershap.surrogate.registry_entry import check_name

from .queries import Limits, Surrogate, dumps

CACHE_ITEMS = 512


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class Service:
    """Registry access, surrogate reuse and the answer cache shared by all requests (thread-safe)."""

    def __init__(self, registry: Registry, limits: Limits, computations: int = 1,
                 cache_items: int = CACHE_ITEMS) -> None:
        self.registry, self.limits, self.cache_items = registry, limits, cache_items
        self._loaded: dict[str, tuple[Path, tuple, Entry, Surrogate]] = {}
        self._load_lock = threading.Lock()
        self._cache: OrderedDict[tuple, bytes] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._key_locks: dict[tuple, list] = {}  # key -> [lock, requests using it]
        self._computing = threading.BoundedSemaphore(computations)
        self.computed = 0  # expensive computations run (cache misses), for tests and health

    # ------------------------------------------------------------ surrogates
    def loaded(self, entry_id: str) -> bool:
        """True when the entry's surrogate is in memory and its files are unchanged (a cheap stat)."""
        hit = self._loaded.get(entry_id)
        return hit is not None and _stamp(hit[0]) == hit[1]

    def surrogate(self, entry_id: str) -> tuple[Entry, Surrogate]:
        """The entry and its surrogate, loaded once and reused while its files are unchanged."""
        check_name(entry_id)
        if self.loaded(entry_id):
            hit = self._loaded[entry_id]
            return hit[2], hit[3]
        with self._load_lock:
            entry, sur = self.registry.load(entry_id)
            marker = entry.surrogate_dir / "metadata.json" if entry.builtin else entry.path / ENTRY_FILE
            self._loaded[entry_id] = (marker, _stamp(marker), entry, sur)
            return entry, sur

    # ------------------------------------------------------------ cache
    def cached(self, entry: Entry, kind: str, query: dict, compute: Callable[[], dict]) -> bytes:
        """Bytes of ``compute()`` for (entry, kind, query), computed at most once while cached. A ``compute``
        that raises caches nothing (the next request computes again) and leaves no per-key lock behind."""
        key = (entry.id, entry.fingerprint, kind, dumps(query))
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            slot = self._key_locks.setdefault(key, [threading.Lock(), 0])
            slot[1] += 1  # requests holding or waiting for this key's lock
        try:
            with slot[0]:
                with self._cache_lock:
                    if key in self._cache:
                        return self._cache[key]
                with self._computing:
                    body = dumps(compute())
                with self._cache_lock:
                    self.computed += 1
                    self._cache[key] = body
                    while len(self._cache) > self.cache_items:
                        self._cache.popitem(last=False)
                return body
        finally:
            with self._cache_lock:
                slot[1] -= 1
                if slot[1] == 0:
                    del self._key_locks[key]

    def in_flight(self) -> int:
        """Queries being computed or waited for now (0 when idle: no per-key lock outlives its requests)."""
        with self._cache_lock:
            return len(self._key_locks)

    def cache_size(self) -> int:
        with self._cache_lock:
            return len(self._cache)
